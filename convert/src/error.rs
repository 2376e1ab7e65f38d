use std::path::PathBuf;

/// A conversion error: names the file and, where there is one, the tensor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// The cause is the error's `source()`, not part of its message, so that a chain
    /// printed with `{:#}` names it once.
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {problem}", path.display())]
    Source { path: PathBuf, problem: String },
    #[error("{}: tensor {tensor:?}: {problem}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        problem: String,
    },
    /// A field of a JSON file of the checkpoint is invalid or unsupported.
    #[error("{file}: {field} {problem}")]
    Field {
        file: String,
        field: String,
        problem: String,
    },
    /// An override contradicts what the checkpoint declares.
    #[error(
        "the checkpoint declares {declared} ({field}), and the override asks for {requested}: \
         refusing to contradict the declaration unless contradictions are allowed explicitly"
    )]
    Contradiction {
        field: String,
        declared: String,
        requested: String,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    NotFound(String),
    /// The output exists and overwriting it was not asked for (`Options::force`).
    #[error("{}: already exists", .0.display())]
    OutputExists(PathBuf),
    /// Warnings were found and `Options::strict` makes them errors.
    #[error("warnings are errors in strict mode:\n  {}", .0.join("\n  "))]
    Strict(Vec<String>),
    /// The thread that writes the output stopped before taking every tensor; its own error
    /// (an I/O failure) is the one to report.
    #[error("the output writer stopped early")]
    WriterStopped,
    #[error(transparent)]
    Format(#[from] tern_format::Error),
}

pub type Result<T, E = ConvertError> = std::result::Result<T, E>;

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ConvertError + '_ {
    move |source| ConvertError::Io {
        path: path.to_path_buf(),
        source,
    }
}
