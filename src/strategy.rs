//! Fleet strategies as a plain function: which siblings restart together with an agent that
//! is being restarted (OTP's one_for_one, one_for_all, rest_for_one).

use crate::spec::Strategy;

/// Siblings (never `crashed` itself) to restart with `crashed`, in start order. `order` is the
/// fleet's agent order; an agent missing from it restarts alone.
pub fn siblings_to_restart(strategy: Strategy, order: &[String], crashed: &str) -> Vec<String> {
    match strategy {
        Strategy::OneForOne => Vec::new(),
        Strategy::OneForAll => order.iter().filter(|a| *a != crashed).cloned().collect(),
        Strategy::RestForOne => match order.iter().position(|a| a == crashed) {
            Some(i) => order[i + 1..].to_vec(),
            None => Vec::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let order: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let cases: &[(Strategy, &str, &[&str])] = &[
            (Strategy::OneForOne, "b", &[]),
            (Strategy::OneForAll, "b", &["a", "c", "d"]),
            (Strategy::RestForOne, "b", &["c", "d"]),
            (Strategy::RestForOne, "d", &[]),
            (Strategy::RestForOne, "a", &["b", "c", "d"]),
            (Strategy::RestForOne, "zz", &[]),
        ];
        for (s, crashed, want) in cases {
            assert_eq!(
                siblings_to_restart(*s, &order, crashed),
                *want,
                "{s:?} {crashed}"
            );
        }
    }
}
