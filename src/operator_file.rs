//! Reading a file from a path someone gave the daemon (a template, a spec, the registry): the
//! path may name a FIFO, a device, a directory, a symlink to any of those, or a huge file.
//! Every such read opens without blocking, insists on a regular file and stops at a size
//! limit, so no input can hang or exhaust the daemon. It does not parse anything.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Largest JSON template fleetd reads.
pub const MAX_TEMPLATE_BYTES: u64 = 1024 * 1024;
/// Largest spec file fleetd reads.
pub const MAX_SPEC_BYTES: u64 = 4 * 1024 * 1024;
/// Largest registry fleetd reads (about 100 000 agents).
pub const MAX_REGISTRY_BYTES: u64 = 256 * 1024 * 1024;

/// Why a file could not be read, in words for the operator (the caller adds which file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("does not exist")]
    NotFound,
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("is {size} bytes, more than the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("is not valid UTF-8")]
    NotUtf8,
    #[error("cannot be read: {0}")]
    Io(String),
}

/// The whole content of the regular file at `path` (symlinks followed), at most `limit`
/// bytes. Never blocks on a FIFO or a device: they are opened non-blocking and refused.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ReadError::NotFound,
            _ => ReadError::Io(e.to_string()),
        })?;
    let meta = f.metadata().map_err(|e| ReadError::Io(e.to_string()))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(ReadError::NotRegular(kind_of(&ft)));
    }
    if meta.len() > limit {
        return Err(ReadError::TooLarge {
            size: meta.len(),
            limit,
        });
    }
    // The size can grow between fstat and read: never take more than limit + 1 bytes.
    let mut buf = Vec::with_capacity(meta.len() as usize);
    (&f).take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ReadError::Io(e.to_string()))?;
    if buf.len() as u64 > limit {
        return Err(ReadError::TooLarge {
            size: buf.len() as u64,
            limit,
        });
    }
    Ok(buf)
}

/// Opens `path` for reading without blocking and without following a final symlink, and only
/// if it is a regular file: for files in an agent's HOME, which the agent itself can replace
/// with a FIFO, a device or a link to another tenant's file.
pub fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW)
        .open(path)?;
    let ft = f.metadata()?.file_type();
    if !ft.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is {}, not a regular file",
            path.display(),
            kind_of(&ft)
        )));
    }
    Ok(f)
}

/// The path of an open descriptor (`/proc/self/fd/<fd>`): what is looked up below it starts
/// at that directory, whatever its path names now.
pub fn fd_path(dir: &std::fs::File) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    std::path::PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
}

/// `name` (one component) inside the open directory `dir`: resolved from that directory, so a
/// tenant who swaps a directory above it for a link cannot redirect the lookup.
pub fn below(dir: &std::fs::File, name: &str) -> std::path::PathBuf {
    fd_path(dir).join(name)
}

/// Opens the directory at `p` without following a final link and without blocking.
pub fn open_dir(p: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(p)
}

/// Opens `rel` (`/`-separated, relative) under the directory `root`, one component at a time
/// from the last one opened and never following a link (a directory or the file itself): for
/// reading in a tenant's HOME with the daemon's rights. Err for a link anywhere on the way.
pub fn open_beneath(root: &Path, rel: &str, dir: bool) -> std::io::Result<std::fs::File> {
    let mut cur = open_dir(root)?;
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        if *part == ".." || *part == "." {
            return Err(std::io::Error::other(format!("{rel}: no '.' or '..'")));
        }
        let last = i + 1 == parts.len();
        cur = if last && !dir {
            open_regular(&below(&cur, part))?
        } else {
            open_dir(&below(&cur, part))?
        };
    }
    Ok(cur)
}

/// `read_bounded` as text.
pub fn read_text(path: &Path, limit: u64) -> Result<String, ReadError> {
    String::from_utf8(read_bounded(path, limit)?).map_err(|_| ReadError::NotUtf8)
}

/// What a non-regular file is, for messages.
pub fn kind_of(ft: &std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Checks what `read_bounded` would refuse, without keeping the content.
pub fn check_readable(path: &Path, limit: u64) -> Result<(), ReadError> {
    read_bounded(path, limit).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_beneath_never_follows_a_link_on_the_way() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("home");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"mine").unwrap();
        std::fs::create_dir_all(d.path().join("outside")).unwrap();
        std::fs::write(d.path().join("outside/f"), b"not mine").unwrap();
        std::os::unix::fs::symlink(d.path().join("outside"), root.join("link")).unwrap();
        std::os::unix::fs::symlink(d.path().join("outside/f"), root.join("a/flink")).unwrap();
        let mut s = String::new();
        use std::io::Read;
        open_beneath(&root, "a/b/f", false)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "mine");
        assert!(open_beneath(&root, "a/b", true).is_ok());
        for bad in ["link/f", "a/flink", "link", "a/../link/f"] {
            assert!(open_beneath(&root, bad, false).is_err(), "{bad}");
        }
        assert!(open_beneath(&root, "link", true).is_err());
    }
    use std::time::{Duration, Instant};

    #[test]
    fn regular_file_within_the_limit_is_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.json");
        std::fs::write(&p, b"{}").unwrap();
        assert_eq!(read_bounded(&p, 2).unwrap(), b"{}");
        assert_eq!(
            read_bounded(&p, 1),
            Err(ReadError::TooLarge { size: 2, limit: 1 })
        );
    }

    #[test]
    fn everything_but_a_regular_file_is_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let link = d.path().join("zero-link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let cases: Vec<(&Path, ReadError)> = vec![
            (d.path(), ReadError::NotRegular("a directory")),
            (&fifo, ReadError::NotRegular("a FIFO")),
            (
                Path::new("/dev/zero"),
                ReadError::NotRegular("a character device"),
            ),
            (&link, ReadError::NotRegular("a character device")),
            (Path::new("/nonexistent/x"), ReadError::NotFound),
        ];
        for (path, want) in cases {
            let t = Instant::now();
            assert_eq!(read_bounded(path, 1024), Err(want), "{}", path.display());
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{} blocked",
                path.display()
            );
        }
    }

    #[test]
    fn invalid_utf8_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bad");
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert_eq!(read_text(&p, 10), Err(ReadError::NotUtf8));
    }
}
