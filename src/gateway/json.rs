//! Top-level JSON objects read as raw slices of their input: the request splice and the
//! stream tap's usage edit both need to know where a field's bytes are, not what they mean.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Keys checked for duplicates by a linear scan before switching to a set.
const SET_AFTER: usize = 16;

/// Most top-level members an object may have. A chat request has a few dozen (OpenAI's
/// fields and a bot's parameters); a body of millions of keys cost seconds of a serving
/// thread and over ten times its size in memory before this limit.
pub const MAX_MEMBERS: usize = 1024;

/// The top-level object as (key, raw value) pairs borrowed from the body, in order.
/// Duplicate keys are refused: two `model` fields would let the gateway and Poe disagree
/// on which bot is being asked.
pub struct TopLevel<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::with_capacity(16);
                // Past a few keys the duplicate check uses a set: a body of a million
                // distinct keys must not cost a million squared comparisons.
                let mut seen: Option<HashSet<Cow<'de, str>>> = None;
                while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
                    let duplicate = match &mut seen {
                        Some(set) => !set.insert(k.clone()),
                        None => fields.iter().any(|(seen, _)| *seen == k),
                    };
                    if duplicate {
                        return Err(de::Error::custom(format!("duplicate key `{k}`")));
                    }
                    if fields.len() == MAX_MEMBERS {
                        return Err(de::Error::custom(format!(
                            "more than {MAX_MEMBERS} top-level members"
                        )));
                    }
                    let v: &'de RawValue = map.next_value()?;
                    fields.push((k, v));
                    if seen.is_none() && fields.len() >= SET_AFTER {
                        seen = Some(fields.iter().map(|(k, _)| k.clone()).collect());
                    }
                }
                Ok(TopLevel(fields))
            }
        }
        d.deserialize_map(V)
    }
}

/// A map key that borrows from the input unless it had escapes.
pub struct Key<'a>(pub Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'a> TopLevel<'a> {
    /// Parses `text` as one JSON object, nothing after it.
    pub fn parse(text: &'a str) -> Result<TopLevel<'a>, serde_json::Error> {
        use serde::Deserialize;
        let mut de = serde_json::Deserializer::from_str(text);
        let fields = TopLevel::deserialize(&mut de)?;
        de.end()?;
        Ok(fields)
    }

    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

/// Where `raw` (borrowed from `text`) sits in `text`.
pub fn span_in(text: &str, raw: &RawValue) -> std::ops::Range<usize> {
    let start = raw.get().as_ptr() as usize - text.as_ptr() as usize;
    start..start + raw.get().len()
}
