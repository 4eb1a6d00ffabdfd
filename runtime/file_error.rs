//! [`FileError`]: the error of every reader of on-disk formats (model
//! configs, weight packs, GGUF files, journal files). Its message always starts with the path.

use std::path::{Path, PathBuf};

/// A file that cannot be read or does not hold what it should.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The operating system could not open, read or map the file.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating-system error.
        source: std::io::Error,
    },
    /// The file's content is malformed or unsupported.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and where (field, tensor or byte offset).
        problem: String,
    },
}

impl FileError {
    /// An [`FileError::Io`] for `path`, for use with `map_err`.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
        move |source| FileError::Io { path: path.into(), source }
    }

    /// An [`FileError::Invalid`] for `path`.
    pub fn invalid(path: &Path, problem: impl Into<String>) -> FileError {
        FileError::Invalid { path: path.into(), problem: problem.into() }
    }
}
