//! A small tmpfs for one broker's data (the disk-full fault tests), unmounted when dropped.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// A tmpfs mounted for one broker's data, unmounted when dropped.
#[derive(Debug)]
pub(crate) struct Tmpfs {
    path: PathBuf,
}

/// Mounting a tmpfs was not allowed here (not root, no `CAP_SYS_ADMIN`, no `mount`).
#[derive(Debug)]
pub struct TmpfsRefused(pub String);

impl std::fmt::Display for TmpfsRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot mount a tmpfs: {}", self.0)
    }
}

impl std::error::Error for TmpfsRefused {}

impl Tmpfs {
    pub(crate) fn mount(path: &Path, mib: u64) -> Result<Self, TmpfsRefused> {
        std::fs::create_dir_all(path).map_err(|error| TmpfsRefused(format!("{}: {error}", path.display())))?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0700"), "tmpfs"])
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .map_err(|error| TmpfsRefused(format!("running mount: {error}")))?;
        if !output.status.success() {
            return Err(TmpfsRefused(String::from_utf8_lossy(&output.stderr).trim().to_string()));
        }
        Ok(Self { path: path.to_path_buf() })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.path).status().is_ok_and(|status| status.success());
        if !unmounted {
            // Still busy (a straggling process): detach it now, freed when released.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}
