//! The uids agents run as under `isolation = "uid"`: a range given to fleetd (systemd's
//! DynamicUser is the model, but the lease is durable like a port lease), one uid per agent
//! kept in its registry record, never handed out again while a HOME owned by it exists or a
//! process runs as it (another daemon's agent: give each daemon a range of its own).
//! Each agent's gid is its uid, so no two agents share a group either.

use std::collections::BTreeSet;
use std::path::Path;

/// Default range: above the subordinate uids `useradd` hands out for the first users
/// (100000 + 65536 n) and far above systemd's DynamicUser range (61184-65519), and below
/// the 2^31 some tools still treat as negative.
pub const DEFAULT_RANGE: &str = "1500000-1599999";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    /// `FIRST-LAST`, both above 1000 (system and login users live below) and below 2^31.
    pub fn parse(s: &str) -> Result<UidRange, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not FIRST-LAST"))?;
        let num = |t: &str| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| format!("{t:?} in {s:?} is not a uid"))
        };
        let (first, last) = (num(a)?, num(b)?);
        if first > last {
            return Err(format!("{s:?}: FIRST is above LAST"));
        }
        if first < 1000 {
            return Err(format!(
                "{s:?}: uids below 1000 belong to the system and its users"
            ));
        }
        if last >= 1 << 31 {
            return Err(format!("{s:?}: uids must stay below 2147483648"));
        }
        Ok(UidRange { first, last })
    }

    pub fn contains(self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// The lowest uid of `range` that no record holds and no HOME on disk is owned by.
pub fn pick(range: UidRange, taken: &BTreeSet<u32>) -> Option<u32> {
    (range.first..=range.last).find(|u| !taken.contains(u))
}

/// Names in an `/etc/passwd`- or `/etc/group`-style text whose id falls in `range`: an agent
/// must never run as a user or group the host already has.
pub fn clashes(text: &str, range: UidRange) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id: u32 = f.nth(1)?.parse().ok()?;
            range.contains(id).then(|| format!("{name} ({id})"))
        })
        .collect()
}

/// Checks the range against the host's users and groups; an error names each clash.
pub fn check_against_host(range: UidRange) -> Result<(), String> {
    let mut found = Vec::new();
    for file in ["/etc/passwd", "/etc/group"] {
        if let Ok(text) = std::fs::read_to_string(file) {
            for c in clashes(&text, range) {
                found.push(format!("{file}: {c}"));
            }
        }
    }
    if found.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "--agent-uids {range} overlaps ids the host already uses: {}",
            found.join(", ")
        ))
    }
}

/// Every uid of `range` a new lease must skip: those `leased` (the registry's records),
/// those owning a HOME on disk, and those some process runs as (another daemon's agent, a
/// user's process).
pub fn taken(
    state_dir: &Path,
    range: UidRange,
    leased: impl IntoIterator<Item = u32>,
) -> BTreeSet<u32> {
    let mut taken = owners_on_disk(state_dir, range);
    taken.extend(
        crate::process::procfs::uids_running()
            .into_iter()
            .filter(|u| range.contains(*u)),
    );
    taken.extend(leased);
    taken
}

/// Owners (in `range`) of the agent HOMEs under `<state>/fleets/*/*`: a uid that still owns a
/// HOME is never leased again, even when no record names it (a HOME kept after its agent).
pub fn owners_on_disk(state_dir: &Path, range: UidRange) -> BTreeSet<u32> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeSet::new();
    let Ok(fleets) = std::fs::read_dir(state_dir.join("fleets")) else {
        return out;
    };
    for fleet in fleets.flatten() {
        let Ok(homes) = std::fs::read_dir(fleet.path()) else {
            continue;
        };
        for home in homes.flatten() {
            if let Ok(m) = std::fs::symlink_metadata(home.path()) {
                if range.contains(m.uid()) {
                    out.insert(m.uid());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_or_say_what_is_wrong() {
        assert_eq!(
            UidRange::parse(DEFAULT_RANGE),
            Ok(UidRange {
                first: 1_500_000,
                last: 1_599_999
            })
        );
        for (bad, why) in [
            ("1500000", "FIRST-LAST"),
            ("x-2000", "not a uid"),
            ("3000-2000", "above LAST"),
            ("0-5000", "below 1000"),
            ("2000-4294967295", "below 2147483648"),
        ] {
            let e = UidRange::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_lowest_free_uid_is_leased_and_a_full_range_gives_none() {
        let r = UidRange::parse("5000-5002").unwrap();
        assert_eq!(pick(r, &BTreeSet::new()), Some(5000));
        assert_eq!(pick(r, &[5000, 5002].into()), Some(5001));
        assert_eq!(pick(r, &[5000, 5001, 5002].into()), None);
    }

    #[test]
    fn host_users_in_the_range_are_clashes() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nbob:x:5001:5001::/home/bob:/bin/sh\n\
                      # comment\nbroken line\ncarol:x:9000:9000::/home/c:/bin/sh\n";
        let r = UidRange::parse("5000-5999").unwrap();
        assert_eq!(clashes(passwd, r), ["bob (5001)"]);
    }

    #[test]
    fn a_uid_owning_a_home_on_disk_is_taken() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("fleets/f/a")).unwrap();
        let me = std::fs::metadata(t.path()).unwrap().uid();
        let r = UidRange {
            first: me,
            last: me,
        };
        assert_eq!(owners_on_disk(t.path(), r), [me].into());
        let other = UidRange {
            first: me + 1,
            last: me + 10,
        };
        assert!(owners_on_disk(t.path(), other).is_empty());
    }
}
