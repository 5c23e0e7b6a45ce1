//! Fleet and agent identifiers: the one validation rule every door (REPL, socket, spec file,
//! library API) applies before anything touches disk. Ids become directory names, so the rule
//! is deliberately narrow.

use crate::error::FleetError;

/// Longest id accepted: 40 characters (first + up to 38 middle + last).
pub const MAX_ID_LEN: usize = 40;

/// The rule, as shown to operators.
pub const ID_RULE: &str =
    "1-40 characters of a-z, 0-9 and '-', starting and ending with a letter or digit";

/// Checks `^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$` without a regex engine.
pub fn is_valid_id(id: &str) -> bool {
    let b = id.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= MAX_ID_LEN
        && alnum(&b[0])
        && alnum(&b[b.len() - 1])
        && b.iter().all(|c| alnum(c) || *c == b'-')
}

/// Validates an id; `kind` is "fleet" or "agent" and appears in the error.
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), FleetError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(FleetError::InvalidId {
            kind: kind.to_string(),
            id: id.to_string(),
            rule: ID_RULE.to_string(),
        })
    }
}

/// Splits `fleet/agent` and validates both halves.
pub fn parse_agent_path(path: &str) -> Result<(String, String), FleetError> {
    match path.split_once('/') {
        Some((f, a)) => {
            validate_id("fleet", f)?;
            validate_id("agent", a)?;
            Ok((f.to_string(), a.to_string()))
        }
        None => Err(FleetError::InvalidArgument {
            field: "agent".into(),
            reason: format!("expected <fleet>/<agent>, got {path:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_rule() {
        for ok in ["a", "0", "agent-1", "a-b-c", &"a".repeat(40), "x9"] {
            assert!(is_valid_id(ok), "{ok:?} should be valid");
        }
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            "A",
            "a_b",
            "../x",
            "-a",
            "a-",
            "a/b",
            "a b",
            "é",
            &"a".repeat(41),
            ".",
            "a.b",
        ] {
            assert!(!is_valid_id(bad), "{bad:?} should be invalid");
            let err = validate_id("agent", bad).unwrap_err().to_string();
            assert!(err.contains("agent"), "{err}");
        }
    }

    #[test]
    fn agent_path_splits_and_validates() {
        assert_eq!(
            parse_agent_path("f/a-1").unwrap(),
            ("f".to_string(), "a-1".to_string())
        );
        assert!(parse_agent_path("f").is_err());
        assert!(parse_agent_path("F/a").is_err());
        assert!(parse_agent_path("f/../a").is_err());
    }
}
