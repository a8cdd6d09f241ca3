//! SQL text: identifiers and literals quoted, for the statements and replication commands the
//! sidecar writes itself.

/// Quotes an identifier with double quotes (a quote inside doubled), so case and punctuation
/// survive.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal. Statements and replication commands both read standard strings
/// (standard_conforming_strings is on since 9.1), where only `'` is special.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_the_quote_character() {
        assert_eq!(quote_ident("slot"), "\"slot\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(
            quote_literal(&quote_ident("It's \"Pub\"")),
            "'\"It''s \"\"Pub\"\"\"'"
        );
    }
}
