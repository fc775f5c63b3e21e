//! SQL names, quoted one way for every component that writes SQL (sinks and lookups).

/// One identifier quoted for SQL, a `"` in it doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `name` or `schema.name` quoted for SQL, each part by [`quote_ident`].
pub fn quote_name(name: &str) -> String {
    name.split('.').map(quote_ident).collect::<Vec<_>>().join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_part_by_part_and_quotes_doubled() {
        assert_eq!(quote_name("public.events"), "\"public\".\"events\"");
        assert_eq!(quote_name("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("x.y"), "\"x.y\"");
    }
}
