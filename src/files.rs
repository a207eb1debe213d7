//! Files a crash never leaves half-written, and one run per output folder.
//!
//! A file is written under a temporary name in its folder (`.{name}.partial`), synced to disk and renamed over the
//! old one, and the folder is synced: a reader sees the old file or the new one, whenever the writer is killed.
//! Temporaries a killed run left behind are removed when the next run starts in that folder (`remove_partials`).
//! A run holds an advisory lock on its output folder for its whole life (`RunLock`); the kernel releases it when the
//! process ends, however it ends.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const PARTIAL_SUFFIX: &str = ".partial";

/// Where `path` is written before it is renamed into place: `.{name}.partial` beside it.
pub fn partial_path(path: &Path) -> PathBuf {
    let name = path.file_name().map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}{PARTIAL_SUFFIX}"))
}

/// Writes `path` atomically: `write` fills the temporary file it is given, which is then synced and renamed over
/// `path`. On an error the temporary file is removed and the error names `path`. A `path` that exists and is no
/// regular file (`/dev/stdout`, a named pipe) is written directly: renaming over it would replace it.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return write(path).with_context(|| format!("cannot write {}", path.display()));
    }
    let tmp = partial_path(path);
    let written = write(&tmp).and_then(|()| sync_file(&tmp));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(error.context(format!("cannot write {}", path.display())));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", path.display()))?;
    sync_parent(path)
}

/// `write_atomically` of a whole file's bytes.
pub fn write_file_atomically(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    write_atomically(path, |tmp| Ok(std::fs::write(tmp, bytes.as_ref())?))
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", path.display()))
}

/// Syncs a folder, so that the names created or renamed in it are on disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", dir.display()))
}

fn sync_parent(path: &Path) -> Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => sync_dir(dir),
        None => sync_dir(Path::new(".")),
    }
}

/// Puts the folder `new` at `path`, in one step when `path` exists (the two are exchanged, then the old one is
/// removed), so that `path` is never missing.
pub fn replace_dir(new: &Path, path: &Path) -> Result<()> {
    sync_dir(new)?;
    if path.exists() {
        exchange(new, path).with_context(|| format!("cannot move {} into place", path.display()))?;
        std::fs::remove_dir_all(new).with_context(|| format!("cannot remove the old {}", path.display()))?;
    } else {
        std::fs::rename(new, path).with_context(|| format!("cannot move {} into place", path.display()))?;
    }
    sync_parent(path)
}

/// Swaps two paths atomically (Linux's `renameat2` with `RENAME_EXCHANGE`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both are valid NUL-terminated paths; renameat2 only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Removes the temporaries (`.*.partial` files and folders) a killed run left in `dir`; returns how many.
pub fn remove_partials(dir: &Path) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(0) };
    let mut removed = 0;
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with('.') && name.ends_with(PARTIAL_SUFFIX)) {
            continue;
        }
        let path = entry.path();
        let result = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        result.with_context(|| format!("cannot remove the leftover {}", path.display()))?;
        removed += 1;
    }
    Ok(removed)
}

/// An exclusive advisory lock (`flock`) on `.prefalign.lock` in a run's output folder, held until dropped or the
/// process ends. The file holds the holder's process id, for the message a second run gets.
pub struct RunLock {
    _file: File,
}

pub const LOCK_FILE: &str = ".prefalign.lock";

impl RunLock {
    /// Creates `dir` if needed and locks it; fails at once, naming the folder and the holder's process id, when
    /// another process holds the lock.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                bail!(
                    "{} is in use by another prefalign run (process {}); wait for it to finish, or choose another \
                     --output-dir",
                    dir.display(),
                    if holder.is_empty() { "unknown" } else { holder }
                );
            }
            return Err(error).with_context(|| format!("cannot lock {}", path.display()));
        }
        file.set_len(0).and_then(|()| file.rewind()).with_context(|| format!("cannot write {}", path.display()))?;
        write!(file, "{}", std::process::id()).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(RunLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_files_and_folders_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.json");
        write_file_atomically(&file, "old").unwrap();
        write_file_atomically(&file, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "new");
        let failed = write_atomically(&file, |tmp| {
            std::fs::write(tmp, "half")?;
            bail!("disk full")
        });
        assert!(format!("{:#}", failed.unwrap_err()).contains("a.json"));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "new");

        let (target, new) = (dir.path().join("checkpoint-1"), dir.path().join(".checkpoint-1.partial"));
        for content in ["first", "second"] {
            std::fs::create_dir_all(&new).unwrap();
            std::fs::write(new.join("x"), content).unwrap();
            replace_dir(&new, &target).unwrap();
            assert_eq!(std::fs::read_to_string(target.join("x")).unwrap(), content);
        }
        std::fs::create_dir_all(dir.path().join(".checkpoint-2.partial")).unwrap();
        std::fs::write(partial_path(&file), "left over").unwrap();
        assert_eq!(remove_partials(dir.path()).unwrap(), 2);
        let mut names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["a.json", "checkpoint-1"]);
    }

    #[test]
    fn a_device_is_written_in_place_not_replaced() {
        use std::os::unix::fs::FileTypeExt;
        write_file_atomically(Path::new("/dev/null"), "to nowhere").unwrap();
        assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
    }

    #[test]
    fn a_second_lock_on_a_folder_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _held = RunLock::acquire(dir.path()).unwrap();
        // flock locks belong to the open file description: a second open in this process conflicts too.
        let refused = RunLock::acquire(dir.path()).err().expect("refused");
        let message = format!("{refused:#}");
        assert!(message.contains("in use by another prefalign run"), "{message}");
        assert!(message.contains(&format!("process {}", std::process::id())), "{message}");
        drop(_held);
        RunLock::acquire(dir.path()).unwrap();
    }
}
