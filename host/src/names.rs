//! Names the host accepts for tenants, profiles, extension instances and
//! sandboxes: 1 to 64 of `A-Z a-z 0-9 . _ -`, not made only of dots, so
//! they are safe in file names, account names, keys and log lines.

/// Checks a name; the error says what kind of name it was.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(&byte));
    if !ok {
        return Err(format!(
            "{what} name {name:?} is invalid: use 1 to 64 letters, digits, '.', '_' or '-'"
        ));
    }
    // `.` and `..` are this directory and its parent wherever a name
    // becomes a file name (a sandbox's directory, say).
    if name.bytes().all(|byte| byte == b'.') {
        return Err(format!(
            "{what} name {name:?} is invalid: a name made only of dots would name a directory above its own"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names_and_rejects_the_rest() {
        for good in ["default", "acme-corp", "t1", "sbx-0f.2", "A_b", ".a", "a.."] {
            assert!(check_name("tenant", good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "x/y", "café", ".", "..", "...", &"n".repeat(65)] {
            let error = check_name("tenant", bad).unwrap_err();
            assert!(error.starts_with("tenant name"), "{error}");
        }
    }
}
