//! A secret read from a file that Kubernetes mounts from a Secret, read again
//! when the file changes so that a rotated secret applies without a restart.
//! `Debug` never shows the content.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

/// The trimmed content of a secret file.
pub struct SecretFile {
    path: PathBuf,
    content: RwLock<Arc<[u8]>>,
    modified: Mutex<Option<SystemTime>>,
}

impl std::fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> std::io::Result<(Arc<[u8]>, Option<SystemTime>)> {
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let bytes = std::fs::read(path)?;
    let trimmed = bytes.trim_ascii();
    if trimmed.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the file is empty",
        ));
    }
    Ok((Arc::from(trimmed), modified))
}

impl SecretFile {
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let (content, modified) = read(path)?;
        Ok(Self {
            path: path.to_owned(),
            content: RwLock::new(content),
            modified: Mutex::new(modified),
        })
    }

    pub fn get(&self) -> Arc<[u8]> {
        self.content
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the file again if it changed; a failed read keeps the old secret.
    pub fn reload_if_changed(&self) -> std::io::Result<bool> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if *self.modified.lock().unwrap_or_else(|e| e.into_inner()) == modified {
            return Ok(false);
        }
        let (content, modified) = read(&self.path)?;
        *self.content.write().unwrap_or_else(|e| e.into_inner()) = content;
        *self.modified.lock().unwrap_or_else(|e| e.into_inner()) = modified;
        Ok(true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
