//! Reading the host's TOML files (sidecars, profiles) with errors that name
//! the file, the line and the key.

/// One line describing a TOML parse or type error: `line N: key `k`: message`.
pub fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', " ");
    let Some(span) = error.span() else {
        return message;
    };
    // A missing key is the table's fault, not any line's.
    if message.starts_with("missing field") {
        return message;
    }
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |newline| newline + 1);
    let line_number = text[..start].matches('\n').count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    // Name the key when the error points into the value of a `key = value`
    // line and the message does not already quote it.
    let key = line
        .split_once('=')
        .filter(|(key, _)| start - line_start > key.len())
        .map(|(key, _)| key.trim().trim_matches('"'))
        .filter(|key| !key.is_empty() && !message.contains(&format!("`{key}`")));
    match key {
        Some(key) => format!("line {line_number}: key `{key}`: {message}"),
        None => format!("line {line_number}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Example {
        count: u32,
    }

    fn error_of(text: &str) -> String {
        let error = toml::from_str::<Example>(text).unwrap_err();
        describe_toml_error(text, &error)
    }

    #[test]
    fn names_line_and_key() {
        let wrong_type = error_of("\ncount = \"three\"\n");
        assert!(
            wrong_type.starts_with("line 2: key `count`: invalid type"),
            "{wrong_type}"
        );
        let unknown = error_of("count = 1\ncuont = 2\n");
        assert!(
            unknown.starts_with("line 2:") && unknown.contains("`cuont`"),
            "{unknown}"
        );
        assert!(!unknown.contains('\n'));
        let missing = error_of("\n");
        assert_eq!(missing, "missing field `count`");
    }
}
