//! Which topics a source reads: names, and patterns (an entry starting with `^` is a
//! regular expression, as in Kafka's and librdkafka's own subscriptions) matched against
//! the cluster's topics at every discovery, so that a new matching topic is picked up
//! like a new partition.

use regex::Regex;

/// The configured `source.topics`.
#[derive(Debug, Clone)]
pub struct TopicSelector {
    names: Vec<String>,
    patterns: Vec<Regex>,
}

impl TopicSelector {
    /// Split `topics` into names and patterns; a pattern that does not compile is an
    /// error saying which.
    pub fn new(topics: &[String]) -> Result<TopicSelector, String> {
        let mut names = Vec::new();
        let mut patterns = Vec::new();
        for t in topics {
            if t.starts_with('^') {
                let re = Regex::new(t).map_err(|e| format!("`{t}` is not a regular expression: {e}"))?;
                patterns.push(re);
            } else {
                names.push(t.clone());
            }
        }
        Ok(TopicSelector { names, patterns })
    }

    /// The topics named outright.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether any entry is a pattern (discovery then lists the cluster's topics).
    pub fn has_patterns(&self) -> bool {
        !self.patterns.is_empty()
    }

    /// Whether `topic` is read: named, or matched by a pattern (Kafka's internal topics,
    /// `__…`, only when named).
    pub fn matches(&self, topic: &str) -> bool {
        self.names.iter().any(|n| n == topic)
            || (!topic.starts_with("__") && self.patterns.iter().any(|p| p.is_match(topic)))
    }

    /// The topics of `existing` (the cluster's) that are read, the named ones first.
    pub fn resolve<'a>(&self, existing: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let mut out = self.names.clone();
        for t in existing {
            if !out.iter().any(|o| o == t) && self.matches(t) {
                out.push(t.to_string());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_patterns_select_topics() {
        let s = TopicSelector::new(&["plain".into(), "^orders-.*".into()]).unwrap();
        assert!(s.has_patterns());
        assert!(s.matches("plain") && s.matches("orders-eu") && !s.matches("payments"));
        assert!(!s.matches("__consumer_offsets"));
        assert_eq!(
            s.resolve(["orders-us", "payments", "plain", "__orders-x"]),
            vec!["plain".to_string(), "orders-us".to_string()]
        );
        assert!(TopicSelector::new(&["^orders-(".into()])
            .unwrap_err()
            .contains("not a regular expression"));
    }
}
