//! Bot-name aliasing: short names to Poe bots, case-insensitive, a list being a fallback chain.

use std::collections::BTreeMap;

use crate::config::AliasTarget;

#[derive(Debug, Clone, Default)]
pub struct Aliases {
    /// (name, bots): few entries, so a scan with `eq_ignore_ascii_case` beats lowercasing
    /// every request's model name into a fresh string for a map lookup.
    entries: Vec<(String, Vec<String>)>,
}

/// Where a request's `model` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// An alias, with its bots in fallback order.
    Alias { name: &'a str, bots: &'a [String] },
    /// Not an alias: sent to Poe as the client wrote it (Poe matches names case-insensitively).
    Direct(&'a str),
}

impl<'a> Route<'a> {
    pub fn bots(&self) -> &[String] {
        match self {
            Route::Alias { bots, .. } => bots,
            Route::Direct(_) => &[],
        }
    }

    pub fn alias(&self) -> Option<&'a str> {
        match *self {
            Route::Alias { name, .. } => Some(name),
            Route::Direct(_) => None,
        }
    }
}

impl Aliases {
    pub fn new(map: &BTreeMap<String, AliasTarget>) -> Self {
        Aliases {
            entries: map
                .iter()
                .map(|(name, target)| (name.clone(), target.bots().to_vec()))
                .collect(),
        }
    }

    pub fn resolve<'a>(&'a self, model: &'a str) -> Route<'a> {
        match self
            .entries
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(model))
        {
            Some((name, bots)) => Route::Alias { name, bots },
            None => Route::Direct(model),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.entries.iter().map(|(n, b)| (n.as_str(), b.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_insensitive_and_chains() {
        let mut m = BTreeMap::new();
        m.insert(
            "claude".to_string(),
            AliasTarget::One("claude-sonnet-4.5".into()),
        );
        m.insert(
            "resilient".to_string(),
            AliasTarget::Chain(vec!["a".into(), "b".into()]),
        );
        let a = Aliases::new(&m);
        assert_eq!(a.resolve("CLAUDE").bots(), ["claude-sonnet-4.5"]);
        assert_eq!(a.resolve("Resilient").bots(), ["a", "b"]);
        assert_eq!(a.resolve("GPT-5"), Route::Direct("GPT-5"));
    }
}
