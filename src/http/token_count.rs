//! The estimate behind `POST /v1/messages/count_tokens`: the input tokens of a Messages
//! request body, read in one pass without building its tree (a body of 50 MiB of small values
//! would take many times that as a `serde_json::Value`).
//!
//! - Text: a token per 4 bytes of the body's strings, keys included, as the ledger estimates a
//!   prompt Poe reported no usage for.
//! - A base64 image: by the size in its header, as Anthropic prices images (width × height /
//!   750, scaled to at most 1,568 pixels a side and about 1,600 tokens).
//! - A base64 PDF: [`PDF_PAGE_TOKENS`] a page.
//! - An image or document by URL or file id: [`MEDIA_TOKENS`].
//! - A thinking block's `signature` and a `redacted_thinking` block: nothing (not read as text).

use std::borrow::Cow;
use std::fmt;

use serde::Deserializer;
use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};

use crate::gateway::completion::estimated_tokens;

/// Tokens for media whose size the gateway cannot see (an image by URL or file id, an image
/// it cannot read): about what a large image costs, as Anthropic scales images down to about
/// 1.15 megapixels.
const MEDIA_TOKENS: u64 = 1_600;
/// Tokens per PDF page: Anthropic reads each page as an image and as text, "typically 1,500
/// to 3,000 tokens per page".
const PDF_PAGE_TOKENS: u64 = 2_000;
/// Bytes per PDF page, when the pages cannot be counted (their objects compressed).
const PDF_PAGE_BYTES: u64 = 60_000;
/// Base64 read for an image's header: enough for a JPEG's metadata segments before its frame.
const IMAGE_HEADER_BASE64: usize = 96 * 1024;

/// The estimated input tokens of a Messages request `body` (already checked as JSON).
pub(crate) fn estimate(body: &[u8]) -> Result<u64, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let seen = Walk.deserialize(&mut de)?;
    let count = seen.count();
    Ok(estimated_tokens(count.text) as u64 + count.media)
}

#[derive(Debug, Default, Clone, Copy)]
struct Count {
    /// Bytes of text.
    text: u64,
    /// Tokens of media.
    media: u64,
}

impl Count {
    fn add(&mut self, other: Count) {
        self.text += other.text;
        self.media += other.media;
    }
}

/// What one value was, for the object or array holding it.
enum Seen<'de> {
    Str(Cow<'de, str>),
    /// An object or array: its count as text, and for an object that is a media `source`,
    /// what the media costs instead (`None`: read it as text).
    Nested {
        count: Count,
        as_source: Option<u64>,
    },
    Other,
}

impl Seen<'_> {
    fn count(&self) -> Count {
        match self {
            Seen::Str(s) => Count {
                text: s.len() as u64,
                media: 0,
            },
            Seen::Nested { count, .. } => *count,
            Seen::Other => Count::default(),
        }
    }

    fn str(&self) -> Option<&str> {
        match self {
            Seen::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Reads one value; objects and arrays are read member by member, so nothing but the strings
/// an object's kind depends on is kept.
struct Walk;

impl<'de> DeserializeSeed<'de> for Walk {
    type Value = Seen<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Seen<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk {
    type Value = Seen<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Seen<'de>, E> {
        Ok(Seen::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Seen<'de>, E> {
        Ok(Seen::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Seen<'de>, E> {
        Ok(Seen::Str(Cow::Owned(v)))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Seen<'de>, E> {
        Ok(Seen::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Seen<'de>, E> {
        Ok(Seen::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Seen<'de>, E> {
        Ok(Seen::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Seen<'de>, E> {
        Ok(Seen::Other)
    }

    fn visit_unit<E>(self) -> Result<Seen<'de>, E> {
        Ok(Seen::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Seen<'de>, A::Error> {
        let mut count = Count::default();
        while let Some(item) = seq.next_element_seed(Walk)? {
            count.add(item.count());
        }
        Ok(Seen::Nested {
            count,
            as_source: None,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Seen<'de>, A::Error> {
        // Counted as text until the object's `type` says otherwise (it may come last).
        let mut count = Count::default();
        let mut kind: Option<String> = None;
        let mut media_type: Option<String> = None;
        let mut data: Option<Cow<'de, str>> = None;
        let mut source: Option<(u64, Seen<'de>)> = None;
        let mut signature = 0u64;
        // A document's `title` and `context`, which a media block keeps as text.
        let mut titles = 0u64;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let value = map.next_value_seed(Walk)?;
            let key_len = key.len() as u64;
            match (&*key, value.str()) {
                ("type", Some(s)) => kind = Some(s.to_owned()),
                ("media_type", Some(s)) => media_type = Some(s.to_owned()),
                ("title" | "context", Some(s)) => titles += key_len + s.len() as u64,
                ("signature", Some(s)) => {
                    signature += key_len + s.len() as u64;
                    continue;
                }
                _ => {}
            }
            if key == "source" {
                source = Some((key_len, value));
                continue;
            }
            count.text += key_len;
            count.add(value.count());
            // Kept for a base64 source's media; counted as text until then.
            if let ("data", Seen::Str(s)) = (&*key, value) {
                data = Some(s);
            }
        }
        let kind = kind.as_deref();
        if kind == Some("redacted_thinking") {
            return Ok(Seen::Other);
        }
        if kind != Some("thinking") {
            count.text += signature;
        }
        if let Some((key_len, source)) = source {
            match (kind, &source) {
                // An image or document counts its media (and a document its title), not its
                // bytes as text.
                (
                    Some("image" | "document"),
                    Seen::Nested {
                        as_source: Some(tokens),
                        ..
                    },
                ) => {
                    count = Count {
                        text: titles,
                        media: *tokens,
                    }
                }
                _ => {
                    count.text += key_len;
                    count.add(source.count());
                }
            }
        }
        // What this object costs if it is a media block's `source`.
        let as_source = match kind {
            Some("base64") => Some(match media_type.as_deref() {
                Some("application/pdf") => pdf_tokens(data.as_deref().unwrap_or("")),
                _ => image_tokens(data.as_deref().unwrap_or("")).unwrap_or(MEDIA_TOKENS),
            }),
            Some("url" | "file") => Some(MEDIA_TOKENS),
            // `text` and `content` sources are text.
            _ => None,
        };
        Ok(Seen::Nested { count, as_source })
    }
}

/// Base64 to bytes, line breaks and spaces (MIME's wrapping) left out.
fn decode(data: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let compact: Cow<[u8]> = if data.iter().any(u8::is_ascii_whitespace) {
        Cow::Owned(
            data.iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect(),
        )
    } else {
        Cow::Borrowed(data)
    };
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .ok()
}

/// An image's tokens by Anthropic's formula, from the dimensions in its header (PNG, JPEG,
/// GIF, WebP); `None` when they cannot be read. Only the start of the base64 is decoded: its
/// first [`IMAGE_HEADER_BASE64`] bytes, cut to whole groups of 4, which decode on their own.
fn image_tokens(data: &str) -> Option<u64> {
    let mut head = data.as_bytes()[..data.len().min(IMAGE_HEADER_BASE64)].to_vec();
    head.retain(|b| !b.is_ascii_whitespace());
    head.truncate(head.len() / 4 * 4);
    let bytes = decode(&head)?;
    let (w, h) = image_size(&bytes)?;
    if w == 0 || h == 0 {
        return None;
    }
    let (mut w, mut h) = (f64::from(w), f64::from(h));
    let long = w.max(h);
    if long > 1568.0 {
        (w, h) = (w * 1568.0 / long, h * 1568.0 / long);
    }
    Some(((w * h / 750.0).ceil() as u64).clamp(1, MEDIA_TOKENS))
}

/// Width and height from an image's header.
fn image_size(b: &[u8]) -> Option<(u32, u32)> {
    let be32 = |i: usize| Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?));
    let be16 = |i: usize| {
        Some(u32::from(u16::from_be_bytes(
            b.get(i..i + 2)?.try_into().ok()?,
        )))
    };
    let le16 = |i: usize| {
        Some(u32::from(u16::from_le_bytes(
            b.get(i..i + 2)?.try_into().ok()?,
        )))
    };
    let le24 = |i: usize| {
        let s = b.get(i..i + 3)?;
        Some(u32::from(s[0]) | (u32::from(s[1]) << 8) | (u32::from(s[2]) << 16))
    };
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Some((be32(16)?, be32(20)?));
    }
    if b.starts_with(b"GIF8") {
        return Some((le16(6)?, le16(8)?));
    }
    if b.starts_with(b"RIFF") && b.get(8..12) == Some(b"WEBP") {
        return match b.get(12..16)? {
            b"VP8X" => Some((le24(24)? + 1, le24(27)? + 1)),
            b"VP8 " => Some((le16(26)? & 0x3fff, le16(28)? & 0x3fff)),
            b"VP8L" => {
                let bits = u32::from_le_bytes(b.get(21..25)?.try_into().ok()?);
                Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
            }
            _ => None,
        };
    }
    if b.starts_with(&[0xff, 0xd8]) {
        // JPEG: the segments up to a start-of-frame marker, which holds the size.
        let mut i = 2;
        while i < b.len() {
            if b[i] != 0xff {
                return None;
            }
            // Fill bytes: any number of 0xFF before a marker.
            while b.get(i + 1) == Some(&0xff) {
                i += 1;
            }
            let marker = *b.get(i + 1)?;
            if matches!(marker, 0xc0..=0xcf) && !matches!(marker, 0xc4 | 0xc8 | 0xcc) {
                return Some((be16(i + 7)?, be16(i + 5)?));
            }
            i += 2 + be16(i + 2)? as usize;
        }
    }
    None
}

/// A PDF's tokens: [`PDF_PAGE_TOKENS`] for each page object (`/Type /Page`, whitespace
/// allowed, not `/Pages` or `/PageLabel`), or for each [`PDF_PAGE_BYTES`] when its pages are
/// inside compressed object streams; one page when it cannot be decoded.
fn pdf_tokens(data: &str) -> u64 {
    let Some(bytes) = decode(data.as_bytes()) else {
        return PDF_PAGE_TOKENS;
    };
    let pdf_space = |b: &u8| matches!(b, b' ' | b'\n' | b'\r' | b'\t' | b'\x0c' | b'\0');
    let pages = memchr::memmem::find_iter(&bytes, b"/Type")
        .filter(|&at| {
            let rest = &bytes[at + 5..];
            let skip = rest.iter().take_while(|b| pdf_space(b)).count();
            let rest = &rest[skip..];
            rest.starts_with(b"/Page")
                && !rest
                    .get(5)
                    .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
        })
        .count() as u64;
    let pages = if pages == 0 {
        (bytes.len() as u64).div_ceil(PDF_PAGE_BYTES).max(1)
    } else {
        pages
    };
    pages * PDF_PAGE_TOKENS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn images_are_read_from_their_headers() {
        let png = |w: u32, h: u32| {
            let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
            b.extend(w.to_be_bytes());
            b.extend(h.to_be_bytes());
            b
        };
        assert_eq!(image_tokens(&b64(&png(800, 600))), Some(640));
        assert_eq!(image_tokens(&b64(&png(4000, 3000))), Some(1_600));
        // Scaled to 1,568 pixels on its long side: 1568 x 39.2.
        assert_eq!(image_tokens(&b64(&png(4000, 100))), Some(82));
        // A JPEG with an APP0 segment and fill bytes before its frame, base64 wrapped by MIME.
        let mut jpeg = vec![
            0xff, 0xd8, 0xff, 0xe0, 0, 4, 0, 0, 0xff, 0xff, 0xc0, 0, 11, 8,
        ];
        jpeg.extend(600u16.to_be_bytes());
        jpeg.extend(800u16.to_be_bytes());
        jpeg.extend([0u8; 32]);
        let wrapped: String = b64(&jpeg)
            .as_bytes()
            .chunks(8)
            .map(|c| format!("{}\r\n", std::str::from_utf8(c).unwrap()))
            .collect();
        assert_eq!(image_tokens(&wrapped), Some(640));
        let gif = [b"GIF89a".as_slice(), &[0x20, 3, 0x58, 2]].concat();
        assert_eq!(image_tokens(&b64(&gif)), Some(640));
        assert_eq!(image_tokens("not base64!"), None);
        // Not ASCII: cut by bytes, never inside a character.
        assert_eq!(image_tokens("€€€"), None);
        assert_eq!(image_tokens(&b64(b"\xff\xd8\xff")), None);
    }

    #[test]
    fn pdf_pages_are_counted_by_their_objects() {
        let pdf = "%PDF-1.7\n<< /Type /Pages /Count 3 >>\n<< /Type /Page >>\n<</Type/Page>>\n\
                   << /Type\n/Page /Parent 1 0 R >>\n<< /Type /PageLabel >>";
        assert_eq!(pdf_tokens(&b64(pdf.as_bytes())), 3 * PDF_PAGE_TOKENS);
        // Pages in compressed streams: by size.
        let packed = vec![b'x'; 150_000];
        assert_eq!(pdf_tokens(&b64(&packed)), 3 * PDF_PAGE_TOKENS);
        assert_eq!(pdf_tokens("%%%"), PDF_PAGE_TOKENS);
    }

    #[test]
    fn blocks_count_by_kind_whatever_the_order_of_their_members() {
        let est = |v: serde_json::Value| estimate(v.to_string().as_bytes()).unwrap();
        let words = "w".repeat(4000);
        let text = est(serde_json::json!({"messages": [{"content": words}]}));
        assert!((1000..1010).contains(&text), "{text}");
        // `type` after `source`: still an image, its base64 not text.
        let image = serde_json::json!({"source": {"data": "iVBORw0KGgo".repeat(1000), "media_type": "image/png", "type": "base64"}, "type": "image"});
        assert_eq!(est(image), 1_600);
        // A document's title counts as text beside its pages.
        let doc = serde_json::json!({"type": "document", "title": words, "source": {"type": "url", "url": "https://x"}});
        let doc = est(doc);
        assert!((2600..2610).contains(&doc), "{doc}");
        // The same shapes outside a media block are text.
        let tool = serde_json::json!({"type": "tool_use", "input": {"source": {"type": "base64", "data": words}}});
        assert!(est(tool) > 1000);
        // Signatures and redacted thinking: nothing.
        let thinking = serde_json::json!([
            {"signature": words, "thinking": "hm", "type": "thinking"},
            {"type": "redacted_thinking", "data": words},
        ]);
        assert!(est(thinking) < 10);
        // A signature elsewhere is text.
        assert!(est(serde_json::json!({"signature": words})) > 1000);
    }
}
