//! The cache key's canonical form of a request body, written straight from the JSON text.
//!
//! Object keys are sorted at every level, so key order and whitespace do not change the key.
//! This used to go through a `serde_json::Value`: a map node and a `String` per member, and a
//! second walk to write it out, which was most of a cacheable request's key cost. Here the
//! parser's events are written out as they come, into one buffer; an object's members are
//! reordered in place once the object ends. The bytes are the same as `Value`'s would be
//! (numbers and strings go through the same serde_json writers), so keys stay stable.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Top-level members the key leaves out: they do not change the answer.
const IGNORED: [&str; 2] = ["stream_options", "user"];

/// Most members and array elements a body's key is made of. Real requests have a few
/// thousand at most; a body of millions (which the parser takes, nested below the top level)
/// would cost a serving thread about a second to key. Past it the request is not cached.
const MAX_VALUES: usize = 100_000;

/// Below this, every whole float is exactly an integer (2^53).
const MAX_EXACT: f64 = 9_007_199_254_740_992.0;

/// Appends the canonical form of the JSON object `body` to `out`, with the top-level
/// `model` replaced by `model` and [`IGNORED`] members left out. `None` if `body` is not a
/// JSON object.
pub(crate) fn write_request(body: &[u8], model: &str, out: &mut Vec<u8>) -> Option<()> {
    let mut de = serde_json::Deserializer::from_slice(body);
    // Sized for the body, so reordering members never regrows it.
    let mut scratch = Vec::with_capacity(body.len() + model.len() + 16);
    let mut left = MAX_VALUES;
    let seed = Canon {
        out,
        scratch: &mut scratch,
        left: &mut left,
        top: Some(model),
    };
    seed.deserialize(&mut de).ok()?;
    de.end().ok()
}

/// Writes one JSON value canonically into `out`. `top` is set only for the request object.
struct Canon<'a, 'm> {
    out: &'a mut Vec<u8>,
    /// Where an object's members are put in order; reused at every level.
    scratch: &'a mut Vec<u8>,
    /// Values still allowed in the whole body (see [`MAX_VALUES`]).
    left: &'a mut usize,
    top: Option<&'m str>,
}

impl<'de> DeserializeSeed<'de> for Canon<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if *self.left == 0 {
            return Err(de::Error::custom("too many values to key"));
        }
        *self.left -= 1;
        if self.top.is_some() {
            // The request itself must be an object.
            d.deserialize_map(self)
        } else {
            d.deserialize_any(self)
        }
    }
}

fn write_scalar<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    // Writing a string or a number into a Vec cannot fail.
    let _ = serde_json::to_writer(out, v);
}

/// Writes a string the parser lent from the input, which it does only for a string written
/// without escapes: with no quote, backslash or control character in it (the parser rejects
/// raw control characters), it needs none written either, and serde_json's writer would
/// give the same bytes after checking each one.
fn write_unescaped(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

fn push_model(out: &mut Vec<u8>, model: &str) {
    out.extend_from_slice(b"\"model\":");
    write_scalar(out, model);
    out.push(b',');
}

/// A member key, borrowed from the input unless it had escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Visitor<'de> for Canon<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        write_scalar(self.out, &v);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        write_scalar(self.out, &v);
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        // A whole number past 64 bits reaches here rounded to a float: two different ones
        // (`"seed": 18446744073709551616` and `...617`) would share a key. Not keyed (the
        // request bypasses the cache).
        if v.fract() == 0.0 && v.abs() >= MAX_EXACT {
            return Err(E::custom("a whole number too large to key exactly"));
        }
        if v.fract() == 0.0 {
            // A whole number written as a float is that integer: `0.0` and `0` (Python's and
            // JavaScript's SDKs write a temperature of 0 each their own way) ask the same.
            write_scalar(self.out, &(v as i64));
        } else {
            // As `Value` does: a float is written back by serde_json's own formatter.
            write_scalar(self.out, &serde_json::Number::from_f64(v));
        }
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        write_scalar(self.out, v);
        Ok(())
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<(), E> {
        write_unescaped(self.out, v);
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.out.push(b'[');
        while seq
            .next_element_seed(Canon {
                out: &mut *self.out,
                scratch: &mut *self.scratch,
                left: &mut *self.left,
                top: None,
            })?
            .is_some()
        {
            self.out.push(b',');
        }
        self.out.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.out.push(b'{');
        let start = self.out.len();
        // Each member is written as `"key":value,` where it lands, and remembered with its
        // key; once the object ends, the members are copied back in key order.
        let mut members: Vec<(Cow<'de, str>, Range<usize>)> = Vec::with_capacity(8);
        let mut saw_model = false;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let from = self.out.len();
            if let Some(model) = self.top {
                if IGNORED.contains(&&*key) {
                    map.next_value::<de::IgnoredAny>()?;
                    continue;
                }
                if key == "stream" {
                    // Only `true` changes the answer's shape: left out, `false` and `null`
                    // are one request.
                    if map.next_value::<Option<bool>>()? == Some(true) {
                        self.out.extend_from_slice(b"\"stream\":true,");
                        members.push((key, from..self.out.len()));
                    }
                    continue;
                }
                if key == "model" {
                    // After alias resolution: an alias and its bot name are one request.
                    map.next_value::<de::IgnoredAny>()?;
                    if !saw_model {
                        saw_model = true;
                        push_model(self.out, model);
                        members.push((key, from..self.out.len()));
                    }
                    continue;
                }
            }
            match &key {
                Cow::Borrowed(k) => write_unescaped(self.out, k),
                Cow::Owned(k) => write_scalar(self.out, k),
            }
            self.out.push(b':');
            map.next_value_seed(Canon {
                out: &mut *self.out,
                scratch: &mut *self.scratch,
                left: &mut *self.left,
                top: None,
            })?;
            self.out.push(b',');
            members.push((key, from..self.out.len()));
        }
        if let Some(model) = self.top
            && !saw_model
        {
            let from = self.out.len();
            push_model(self.out, model);
            members.push((Cow::Borrowed("model"), from..self.out.len()));
        }
        if !members.windows(2).all(|w| w[0].0 <= w[1].0) {
            members.sort_by(|a, b| a.0.cmp(&b.0));
            self.scratch.clear();
            for (_, range) in &members {
                self.scratch.extend_from_slice(&self.out[range.clone()]);
            }
            self.out.truncate(start);
            self.out.extend_from_slice(self.scratch);
        }
        self.out.push(b'}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The old way, kept as the reference: a `Value`, then a sorted walk.
    fn reference(body: &[u8], model: &str) -> Option<Vec<u8>> {
        let serde_json::Value::Object(mut m) = serde_json::from_slice(body).ok()? else {
            return None;
        };
        for k in IGNORED {
            m.remove(k);
        }
        match m.get("stream") {
            None | Some(serde_json::Value::Bool(true)) => {}
            Some(serde_json::Value::Bool(false) | serde_json::Value::Null) => {
                m.remove("stream");
            }
            Some(_) => return None,
        }
        m.insert("model".into(), serde_json::Value::String(model.into()));
        let mut out = Vec::new();
        walk(&serde_json::Value::Object(m), &mut out);
        Some(out)
    }

    fn walk(v: &serde_json::Value, out: &mut Vec<u8>) {
        use serde_json::Value;
        match v {
            Value::Object(m) => {
                let mut e: Vec<_> = m.iter().collect();
                e.sort_unstable_by(|a, b| a.0.cmp(b.0));
                out.push(b'{');
                for (k, v) in e {
                    write_scalar(out, k);
                    out.push(b':');
                    walk(v, out);
                    out.push(b',');
                }
                out.push(b'}');
            }
            Value::Array(a) => {
                out.push(b'[');
                for x in a {
                    walk(x, out);
                    out.push(b',');
                }
                out.push(b']');
            }
            Value::Number(n)
                if n.is_f64()
                    && n.as_f64()
                        .is_some_and(|f| f.fract() == 0.0 && f.abs() < MAX_EXACT) =>
            {
                write_scalar(out, &(n.as_f64().unwrap() as i64))
            }
            other => write_scalar(out, other),
        }
    }

    fn canon(body: &str, model: &str) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        write_request(body.as_bytes(), model, &mut out).map(|()| out)
    }

    /// Whole numbers past 64 bits reach the key as rounded floats, so two of them shared an
    /// entry: such a request is not keyed. Those within 64 bits, and real floats, are.
    #[test]
    fn whole_numbers_past_64_bits_are_not_keyed() {
        for body in [
            r#"{"model":"m","seed":18446744073709551616}"#,
            r#"{"model":"m","seed":-9223372036854775809}"#,
        ] {
            assert!(canon(body, "m").is_none(), "{body}");
        }
        for body in [
            r#"{"model":"m","seed":18446744073709551615}"#,
            r#"{"model":"m","seed":-9223372036854775808}"#,
            r#"{"model":"m","t":0.5,"f":1.0}"#,
        ] {
            assert!(canon(body, "m").is_some(), "{body}");
        }
    }

    #[test]
    fn same_bytes_as_the_value_walk() {
        for body in [
            r#"{"model":"a","messages":[{"role":"user","content":"x"}],"temperature":0}"#,
            r#"{"temperature":0.0,"messages":[{"content":"x","role":"user"}],"model":"A"}"#,
            r#"{"z":1,"a":{"y":[1,2.5,-3,1e2,{"b":null,"a":true}],"x":"\u00e9\n\"q\""},"model":"m","user":"u","stream_options":{"include_usage":true}}"#,
            r#"{"model":"m","n":18446744073709551615,"f":1.0000000000000002,"neg":-9223372036854775808,"big":1e400}"#,
            r#"{"model":"m","esc\"aped":1,"esc":2,"\u0041":3}"#,
            r#"{"messages":[],"model":"m","tools":[{"function":{"parameters":{"type":"object","properties":{"b":{},"a":{}}},"name":"f"},"type":"function"}]}"#,
            r#"  {"model" : "m" , "seed" : 7 }  "#,
            r#"{"seed":7}"#,
            r#"{}"#,
        ] {
            assert_eq!(
                canon(body, "bot|other"),
                reference(body.as_bytes(), "bot|other"),
                "{body}"
            );
        }
    }

    /// Spellings of one request are one key: a whole float and its integer, and a stream
    /// flag left out, `false` or `null`.
    #[test]
    fn spellings_of_one_request_are_one_key() {
        let same = |a: &str, b: &str| assert_eq!(canon(a, "m"), canon(b, "m"), "{a} / {b}");
        same(r#"{"temperature":0}"#, r#"{"temperature":0.0}"#);
        same(r#"{"temperature":0}"#, r#"{"temperature":-0.0}"#);
        same(r#"{"max_tokens":100}"#, r#"{"max_tokens":1e2}"#);
        same(r#"{"a":1}"#, r#"{"a":1,"stream":false}"#);
        same(r#"{"a":1}"#, r#"{"stream":null,"a":1}"#);
        assert_ne!(
            canon(r#"{"a":1}"#, "m"),
            canon(r#"{"a":1,"stream":true}"#, "m")
        );
        assert_ne!(canon(r#"{"t":0.5}"#, "m"), canon(r#"{"t":0}"#, "m"));
    }

    /// A body of more values than [`MAX_VALUES`] is not keyed (so not cached), rather than
    /// holding a serving thread for as long as it takes.
    #[test]
    fn a_flood_of_values_is_not_keyed() {
        let values = |n: usize| {
            let members: Vec<String> = (0..n).map(|i| format!("\"k{i}\":0")).collect();
            format!("{{\"a\":{{{}}}}}", members.join(","))
        };
        // The object itself and `a` count too.
        assert!(canon(&values(MAX_VALUES - 2), "m").is_some());
        assert_eq!(canon(&values(MAX_VALUES - 1), "m"), None);
    }

    #[test]
    fn not_an_object_or_not_json() {
        for body in ["[1,2]", "\"x\"", "{\"model\":", "{\"a\":1} trailing", ""] {
            assert_eq!(canon(body, "m"), None, "{body:?}");
            assert_eq!(reference(body.as_bytes(), "m"), None, "{body:?}");
        }
    }

    /// Any JSON text (members in any order, duplicates and escapes included) gets the same
    /// bytes as the `Value` walk, or is refused by both.
    mod props {
        use super::*;
        use proptest::prelude::*;

        fn json_text() -> impl Strategy<Value = String> {
            // Distinct after unescaping, so no object has a key twice (`Value` would keep
            // only the last of them; the stream keeps all).
            let keys = vec![
                "a",
                "b",
                "model",
                "user",
                "Z",
                "\\u00e9",
                "k\\\"q",
                "stream_options",
                "stream",
            ];
            let leaf = prop_oneof![
                Just("null".to_string()),
                any::<bool>().prop_map(|b| b.to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<u64>().prop_map(|n| n.to_string()),
                (-1e6f64..1e6).prop_map(|f| format!("{f:e}")),
                "[a-z\\n\"é\u{7f}\u{2028}\t]{0,6}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            ];
            leaf.prop_recursive(4, 40, 6, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..5)
                        .prop_map(|v| format!("[{}]", v.join(" , "))),
                    (
                        prop::sample::subsequence(keys.clone(), 0..=5).prop_shuffle(),
                        prop::collection::vec(inner, 5),
                    )
                        .prop_map(|(ks, vs)| {
                            let members: Vec<String> = ks
                                .iter()
                                .zip(vs)
                                .map(|(k, v)| format!("\"{k}\":{v}"))
                                .collect();
                            format!("{{{}}}", members.join(","))
                        }),
                ]
            })
        }

        proptest! {
            #[test]
            fn matches_the_value_walk(body in json_text(), model in "[a-z|]{1,8}") {
                prop_assert_eq!(canon(&body, &model), reference(body.as_bytes(), &model), "{}", body);
            }
        }
    }
}
