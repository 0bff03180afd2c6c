//! The two reads the tap makes in every response, done cheaply: finding a JSON key in a
//! chunk, and reading the usage object in the shape Poe sends it.
//!
//! Both run once per SSE event (a stream has dozens to thousands), so their fixed costs matter
//! more than their speed per byte.

use memchr::memmem;

use super::tap::Usage;

/// A forward search for one JSON key (`"content":`), non-overlapping like memchr's own.
///
/// memchr's SIMD search looks first for two bytes of the needle at their offsets, picked by how
/// rare they are in ordinary text. For these keys it picks the opening quote and the colon,
/// and in JSON those sit at that distance in many other keys (`"created":` and `"choices":`
/// have `"content":`'s pair), so most candidates it stops at are false. Here the caller picks
/// the pair, for JSON. Haystacks too short for the SIMD loop, and CPUs without AVX2, use
/// memchr's usual searcher.
pub(crate) struct KeyFinder {
    needle: &'static [u8],
    any: memmem::Finder<'static>,
    #[cfg(target_arch = "x86_64")]
    avx2: Option<memchr::arch::x86_64::avx2::packedpair::Finder>,
}

impl KeyFinder {
    /// `pair`: the offsets in `needle` of the two bytes the SIMD loop looks for.
    pub(crate) fn new(needle: &'static [u8], pair: (u8, u8)) -> KeyFinder {
        #[cfg(not(target_arch = "x86_64"))]
        let _ = pair;
        KeyFinder {
            needle,
            any: memmem::Finder::new(needle),
            #[cfg(target_arch = "x86_64")]
            avx2: memchr::arch::all::packedpair::Pair::with_indices(needle, pair.0, pair.1)
                .and_then(|p| memchr::arch::x86_64::avx2::packedpair::Finder::with_pair(needle, p)),
        }
    }

    pub(crate) fn needle_len(&self) -> usize {
        self.needle.len()
    }

    pub(crate) fn find(&self, haystack: &[u8]) -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        if let Some(f) = &self.avx2
            && haystack.len() >= f.min_haystack_len()
        {
            return f.find(haystack, self.needle);
        }
        self.any.find(haystack)
    }

    pub(crate) fn find_iter<'h>(&'h self, haystack: &'h [u8]) -> impl Iterator<Item = usize> + 'h {
        let mut from = 0;
        std::iter::from_fn(move || {
            let at = from + self.find(haystack.get(from..)?)?;
            from = at + self.needle.len();
            Some(at)
        })
    }
}

/// The usage object `value` starts with (what follows it is not read), as serde would read it
/// into [`Usage`]: `None` where serde fails (`null`, a negative or fractional count, a
/// duplicate member).
///
/// Serde's derived reader cost more than the rest of the tap's work on a usage chunk. Poe's
/// usage is three integer members, which are read here directly; any other shape (another
/// member such as `prompt_tokens_details`, an escape, a number that is not a plain integer)
/// goes to serde.
pub(crate) fn parse_usage(value: &[u8]) -> Option<Usage> {
    let mut u = flat_usage(value).or_else(|| serde_usage(value))?;
    if u.total_tokens == 0 {
        u.total_tokens = u.prompt_tokens.saturating_add(u.completion_tokens);
    }
    Some(u)
}

/// The token counts of a Messages API usage object, each `None` where the object leaves it
/// out: a stream's `message_delta` repeats only the counts that changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MessagesUsage {
    pub input: Option<u64>,
    pub cache_creation: Option<u64>,
    /// Of `cache_creation`, the tokens written for an hour (`cache_creation`'s
    /// `ephemeral_1h_input_tokens`), which cost more than five minutes' writes.
    pub cache_creation_1h: Option<u64>,
    pub cache_read: Option<u64>,
    pub output: Option<u64>,
    /// A `message_delta` came: `output` is the answer's count, not `message_start`'s
    /// placeholder (1) for an answer that had not started.
    pub final_output: bool,
}

impl MessagesUsage {
    /// Takes the counts `newer` has, keeping the others. The counts are cumulative, so the
    /// larger one stands: some upstreams repeat the input counts as 0 in `message_delta`.
    pub(crate) fn update(&mut self, newer: MessagesUsage) {
        self.input = self.input.max(newer.input);
        self.cache_creation = self.cache_creation.max(newer.cache_creation);
        self.cache_creation_1h = self.cache_creation_1h.max(newer.cache_creation_1h);
        self.cache_read = self.cache_read.max(newer.cache_read);
        self.output = self.output.max(newer.output);
    }

    /// Whether any count came.
    pub(crate) fn usage_seen(&self) -> bool {
        self.input.is_some()
            || self.cache_creation.is_some()
            || self.cache_read.is_some()
            || self.output.is_some()
    }

    /// In chat completions' terms. Anthropic's `input_tokens` leaves out the tokens written
    /// to and read from its prompt cache; the prompt counts them all, as OpenAI's
    /// `prompt_tokens` counts its cached tokens.
    pub(crate) fn as_usage(&self) -> Usage {
        let prompt = [self.input, self.cache_creation, self.cache_read]
            .into_iter()
            .map(|n| n.unwrap_or(0))
            .fold(0u64, u64::saturating_add);
        let completion = self.output.unwrap_or(0);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            cache_read_tokens: self.cache_read.unwrap_or(0),
        }
    }
}

/// The Messages API usage object `value` starts with; `None` for `null` or no object.
/// Counts written as `3.0` are read; `null` or other counts are left out.
pub(crate) fn parse_messages_usage(value: &[u8]) -> Option<MessagesUsage> {
    #[derive(serde::Deserialize)]
    struct Lenient {
        #[serde(default)]
        input_tokens: Option<serde_json::Number>,
        #[serde(default)]
        cache_creation_input_tokens: Option<serde_json::Number>,
        #[serde(default)]
        cache_read_input_tokens: Option<serde_json::Number>,
        #[serde(default)]
        output_tokens: Option<serde_json::Number>,
        /// The split of the cache writes by how long they are kept.
        #[serde(default)]
        cache_creation: Option<Inner<Split>>,
    }
    #[derive(serde::Deserialize)]
    struct Split {
        #[serde(default)]
        ephemeral_1h_input_tokens: Option<serde_json::Number>,
    }
    let raw = serde_json::Deserializer::from_slice(value)
        .into_iter::<Lenient>()
        .next()?
        .ok()?;
    Some(MessagesUsage {
        input: raw.input_tokens.and_then(count),
        cache_creation: raw.cache_creation_input_tokens.and_then(count),
        cache_creation_1h: match raw.cache_creation {
            Some(Inner::Known(split)) => split.ephemeral_1h_input_tokens.and_then(count),
            _ => None,
        },
        cache_read: raw.cache_read_input_tokens.and_then(count),
        output: raw.output_tokens.and_then(count),
        final_output: false,
    })
}

/// An object member of a usage, read for counts inside it (`prompt_tokens_details`,
/// `cache_creation`): another shape reads as none, and does not cost the usage its other
/// counts.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Inner<T> {
    Known(T),
    Other(serde::de::IgnoredAny),
}

/// A token count: a whole number, written as an integer or as `3.0`.
fn count(n: serde_json::Number) -> Option<u64> {
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..1e15).contains(f))
            .map(|f| f as u64)
    })
}

/// The one usage value `value` starts with, through serde: any layout and other members
/// (`*_details`), the Responses API's names (`input_tokens`, `output_tokens`), and counts
/// written as `3.0` or `null` (0; the other counts are kept). The cached tokens are read from
/// `prompt_tokens_details` (`input_tokens_details` on the Responses API); a details member of
/// another shape counts none, and does not cost the usage its other counts.
fn serde_usage(value: &[u8]) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct Lenient {
        #[serde(default, alias = "input_tokens")]
        prompt_tokens: Option<serde_json::Number>,
        #[serde(default, alias = "output_tokens")]
        completion_tokens: Option<serde_json::Number>,
        #[serde(default)]
        total_tokens: Option<serde_json::Number>,
        #[serde(default)]
        prompt_tokens_details: Option<Inner<Details>>,
        #[serde(default)]
        input_tokens_details: Option<Inner<Details>>,
    }
    #[derive(serde::Deserialize)]
    struct Details {
        #[serde(default)]
        cached_tokens: Option<serde_json::Number>,
    }
    let raw = serde_json::Deserializer::from_slice(value)
        .into_iter::<Lenient>()
        .next()?
        .ok()?;
    let count = |n: Option<serde_json::Number>| n.and_then(count).unwrap_or(0);
    let cached = |d: Option<Inner<Details>>| match d {
        Some(Inner::Known(d)) => count(d.cached_tokens),
        _ => 0,
    };
    Some(Usage {
        prompt_tokens: count(raw.prompt_tokens),
        completion_tokens: count(raw.completion_tokens),
        total_tokens: count(raw.total_tokens),
        cache_read_tokens: cached(raw.prompt_tokens_details).max(cached(raw.input_tokens_details)),
    })
}

/// `value` read as `{"prompt_tokens":N,...}` with only the three known members, each at most
/// once, as JSON integers; `None` for anything else.
fn flat_usage(value: &[u8]) -> Option<Usage> {
    let mut p = Cursor { b: value, at: 0 };
    p.ws();
    p.eat(b'{')?;
    let mut u = Usage::default();
    let mut seen = [false; 3];
    p.ws();
    if p.eat(b'}').is_some() {
        return Some(u);
    }
    loop {
        p.ws();
        p.eat(b'"')?;
        let start = p.at;
        let len = memchr::memchr2(b'"', b'\\', &p.b[start..])?;
        p.at += len;
        p.eat(b'"')?;
        let slot = match &p.b[start..start + len] {
            b"prompt_tokens" => 0,
            b"completion_tokens" => 1,
            b"total_tokens" => 2,
            _ => return None,
        };
        if std::mem::replace(&mut seen[slot], true) {
            return None;
        }
        p.ws();
        p.eat(b':')?;
        p.ws();
        let n = p.integer()?;
        match slot {
            0 => u.prompt_tokens = n,
            1 => u.completion_tokens = n,
            _ => u.total_tokens = n,
        }
        p.ws();
        match p.next()? {
            b',' => continue,
            b'}' => return Some(u),
            _ => return None,
        }
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn ws(&mut self) {
        while matches!(self.b.get(self.at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn next(&mut self) -> Option<u8> {
        let c = *self.b.get(self.at)?;
        self.at += 1;
        Some(c)
    }

    fn eat(&mut self, want: u8) -> Option<()> {
        (self.b.get(self.at) == Some(&want)).then(|| self.at += 1)
    }

    /// A JSON integer that fits u64, ending before a byte that cannot continue a number.
    fn integer(&mut self) -> Option<u64> {
        let digits = self.b[self.at..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        let text = &self.b[self.at..self.at + digits];
        // No leading zeros in JSON, and a fraction or exponent is serde's to judge.
        if digits == 0
            || (digits > 1 && text[0] == b'0')
            || matches!(self.b.get(self.at + digits), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        let mut n: u64 = 0;
        for d in text {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        }
        self.at += digits;
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wherever the direct read answers, it answers as serde does; the usual shapes are its.
    #[test]
    fn the_direct_read_agrees_with_serde() {
        let cases: &[&[u8]] = &[
            br#"{"prompt_tokens":14,"completion_tokens":12,"total_tokens":26}}"#,
            br#" { "total_tokens" : 3 ,"prompt_tokens":1 , "completion_tokens":2 } ,"x":1"#,
            b"{}",
            br#"{"prompt_tokens":0}"#,
            br#"{"prompt_tokens":18446744073709551615}"#,
            br#"{"prompt_tokens":18446744073709551616}"#,
            br#"{"prompt_tokens":01}"#,
            br#"{"prompt_tokens":1.0}"#,
            br#"{"prompt_tokens":1e2}"#,
            br#"{"prompt_tokens":-1}"#,
            br#"{"prompt_tokens":null}"#,
            br#"{"prompt_tokens":1,"prompt_tokens":2}"#,
            br#"{"prompt_tokens":1,}"#,
            br#"{"prompt_tokens":1"#,
            br#"{"prompt_tokens":1 2}"#,
            br#"{"pr\u006fmpt_tokens":5}"#,
            br#"{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":1}}"#,
            br#"{"other":[1,2,{"a":"}"}],"total_tokens":9}"#,
            b"null",
            b"",
            b"[1]",
        ];
        for c in cases {
            if let Some(direct) = flat_usage(c) {
                assert_eq!(
                    Some(direct),
                    serde_usage(c),
                    "{}",
                    String::from_utf8_lossy(c)
                );
            }
        }
        assert!(flat_usage(cases[0]).is_some());
        assert!(flat_usage(cases[1]).is_some());
    }

    /// Shapes a provider may send beside the plain one: the Responses API's names, counts
    /// written as floats or `null`, no total.
    #[test]
    fn other_usage_shapes_are_read() {
        let u = |s: &str| {
            parse_usage(s.as_bytes())
                .map(|u| (u.prompt_tokens, u.completion_tokens, u.total_tokens))
        };
        assert_eq!(
            u(r#"{"input_tokens":3,"output_tokens":4}"#),
            Some((3, 4, 7))
        );
        assert_eq!(
            u(r#"{"prompt_tokens":1.0,"completion_tokens":null,"total_tokens":2}"#),
            Some((1, 0, 2))
        );
        assert_eq!(
            u(r#"{"prompt_tokens":-1,"completion_tokens":2.5}"#),
            Some((0, 0, 0))
        );
        assert_eq!(u(r#"{"prompt_tokens":"3"}"#), None);
        assert_eq!(u("null"), None);
    }

    /// The prompt cache's share of the prompt, in chat completions' and the Responses API's
    /// names; a details member of an odd shape reads as no cached tokens, the other counts kept.
    #[test]
    fn cached_tokens_are_read_from_either_apis_details() {
        let u = |s: &str| parse_usage(s.as_bytes()).map(|u| (u.prompt_tokens, u.cache_read_tokens));
        assert_eq!(
            u(
                r#"{"prompt_tokens":10,"completion_tokens":1,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":8,"audio_tokens":0}}"#
            ),
            Some((10, 8))
        );
        assert_eq!(
            u(
                r#"{"input_tokens":10,"input_tokens_details":{"cached_tokens":4},"output_tokens":2,"output_tokens_details":{"reasoning_tokens":1}}"#
            ),
            Some((10, 4))
        );
        assert_eq!(
            u(r#"{"prompt_tokens":10,"prompt_tokens_details":{}}"#),
            Some((10, 0))
        );
        assert_eq!(
            u(r#"{"prompt_tokens":10,"prompt_tokens_details":null}"#),
            Some((10, 0))
        );
        assert_eq!(
            u(r#"{"prompt_tokens":10,"prompt_tokens_details":{"cached_tokens":3.0}}"#),
            Some((10, 3))
        );
        assert_eq!(
            u(r#"{"prompt_tokens":10,"prompt_tokens_details":{"cached_tokens":"3"}}"#),
            Some((10, 0))
        );
        assert_eq!(
            u(r#"{"prompt_tokens":10,"prompt_tokens_details":"n/a"}"#),
            Some((10, 0))
        );
        assert_eq!(
            u(r#"{"prompt_tokens":10,"completion_tokens":2}"#),
            Some((10, 0))
        );
        let m = parse_messages_usage(
            br#"{"input_tokens":1,"cache_creation_input_tokens":2,"cache_read_input_tokens":3,"output_tokens":4}"#,
        )
        .unwrap();
        assert_eq!(
            (m.as_usage().prompt_tokens, m.as_usage().cache_read_tokens),
            (6, 3)
        );
    }

    #[test]
    fn the_key_finder_finds_what_memmem_finds() {
        let f = KeyFinder::new(b"\"content\":", (3, 9));
        let plain = memmem::Finder::new(b"\"content\":");
        let chunk = br#"{"id":"chatcmpl-1","created":1,"choices":[{"index":0,"delta":{"content":"a \"content\": b"},"finish_reason":null},{"delta":{"content":"c"}}],"content":1}"#;
        let mut hay = chunk.to_vec();
        // Every length, so both the SIMD loop and the short-haystack path are covered.
        while !hay.is_empty() {
            let ours: Vec<usize> = f.find_iter(&hay).collect();
            let theirs: Vec<usize> = plain.find_iter(&hay).collect();
            assert_eq!(ours, theirs, "{}", String::from_utf8_lossy(&hay));
            hay.remove(0);
        }
    }
}
