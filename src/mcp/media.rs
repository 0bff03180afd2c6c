//! Media URLs in a media bot's answer.
//!
//! Poe's image and video bots answer with markdown such as
//! `![image.png](https://pfst.cf2.poecdn.net/base/image/<hash>?w=1024&h=1024)` followed by the
//! bare URL; audio bots with a bare URL. This finds each distinct URL once, in order, with the
//! name the markdown gave it when there was one.

use super::attachments::{mime_from_name, url_file_name};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    pub url: String,
    pub name: String,
    pub mime_type: Option<String>,
}

/// Every distinct http(s) URL in `text`: markdown links and images first named by their text,
/// bare URLs named after their last path segment.
pub fn extract(text: &str) -> Vec<Media> {
    // (position, url, name from the markdown)
    let mut found: Vec<(usize, String, Option<String>)> = Vec::new();

    // Markdown `[name](url)` and `![name](url)`.
    for (close, _) in text.match_indices("](") {
        let Some(open) = text[..close].rfind(['[', '\n']) else {
            continue;
        };
        if text.as_bytes()[open] != b'[' {
            continue;
        }
        let name = text[open + 1..close].trim();
        let rest = &text[close + 2..];
        let target = rest
            .split([')', ' ', '\n', '\t'])
            .next()
            .unwrap_or_default();
        let target = target.trim_start_matches('<').trim_end_matches('>');
        if is_http(target) {
            let name = (!name.is_empty()).then(|| name.to_string());
            found.push((open, target.to_string(), name));
        }
    }

    // Bare URLs (also those inside the markdown, which dedupe below).
    let mut at = 0;
    while let Some(i) = find_scheme(&text[at..]) {
        let start = at + i;
        let end = text[start..]
            .find(|c: char| {
                c.is_whitespace() || matches!(c, ')' | ']' | '>' | '<' | '"' | '\'' | '`')
            })
            .map_or(text.len(), |n| start + n);
        let url = text[start..end].trim_end_matches(['.', ',', ';', ':', '!', '?']);
        if is_http(url) {
            found.push((start, url.to_string(), None));
        }
        at = end.max(start + 1);
    }

    found.sort_by_key(|(pos, _, _)| *pos);
    // (media, named by markdown)
    let mut out: Vec<(Media, bool)> = Vec::new();
    for (_, url, name) in found {
        if let Some((existing, named)) = out.iter_mut().find(|(m, _)| m.url == url) {
            if let Some(n) = name.filter(|_| !*named) {
                existing.mime_type = mime_from_name(&n).map(str::to_string);
                existing.name = n;
                *named = true;
            }
            continue;
        }
        let named = name.is_some();
        let name = name
            .or_else(|| url_file_name(&url))
            .unwrap_or_else(|| format!("media-{}", out.len() + 1));
        let media = Media {
            mime_type: mime_from_name(&name).map(str::to_string),
            url,
            name,
        };
        out.push((media, named));
    }
    out.into_iter().map(|(m, _)| m).collect()
}

fn find_scheme(s: &str) -> Option<usize> {
    let a = s.find("https://");
    let b = s.find("http://");
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn is_http(url: &str) -> bool {
    (url.starts_with("https://") || url.starts_with("http://"))
        && url
            .split_once("://")
            .is_some_and(|(_, rest)| !rest.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poe_image_markdown() {
        let url = "https://pfst.cf2.poecdn.net/base/image/abc?w=1024&h=1024";
        let text = format!("![image.png]({url})\n\n{url}");
        let media = extract(&text);
        assert_eq!(
            media,
            vec![Media {
                url: url.into(),
                name: "image.png".into(),
                mime_type: Some("image/png".into()),
            }]
        );
    }

    #[test]
    fn several_and_bare() {
        let text = "Here: ![a.png](https://x.test/1.png) and [clip](<https://x.test/v/clip.mp4>).\n\
                    Also https://x.test/song.mp3, done. And http://x.test/1.png again? no: https://x.test/1.png.";
        let media = extract(text);
        let urls: Vec<&str> = media.iter().map(|m| m.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "https://x.test/1.png",
                "https://x.test/v/clip.mp4",
                "https://x.test/song.mp3",
                "http://x.test/1.png"
            ]
        );
        assert_eq!(media[1].name, "clip");
        assert_eq!(media[2].mime_type.as_deref(), Some("audio/mpeg"));
        assert!(extract("no links [here](relative/path)").is_empty());
    }
}
