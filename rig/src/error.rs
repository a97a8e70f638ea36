//! Errors of the rig crate; each variant names the operation that failed.

use std::path::PathBuf;

/// An operation of this crate failed.
#[derive(Debug, thiserror::Error)]
pub enum RigError {
    /// The host-wide rig lock cannot be taken.
    #[error("taking the KVM rig lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Creating the payload's temporary directory failed.
    #[error("creating a payload directory")]
    PayloadDir(#[source] std::io::Error),
    /// A payload entry name was empty, absolute or contained `..`.
    #[error("adding {name:?} to the payload: the name must be a relative path without `..`")]
    PayloadName {
        /// The rejected name.
        name: String,
    },
    /// Copying or writing a file into the payload failed.
    #[error("adding {from} to the payload as {name:?}")]
    PayloadCopy {
        /// The source file (or `<bytes>`).
        from: PathBuf,
        /// The name inside the payload.
        name: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Starting a child process failed.
    #[error("starting {program}")]
    Spawn {
        /// The program that could not be started.
        program: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for a child process failed.
    #[error("waiting for {program}")]
    Wait {
        /// The program waited for.
        program: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The child was killed by a signal, so it has no exit status.
    #[error("{program} was killed by signal {signal}")]
    Signaled {
        /// The program.
        program: String,
        /// The signal number.
        signal: i32,
    },
    /// `cargo build` for the static binaries failed.
    #[error("building static binaries of {packages:?}: cargo exited with {status}")]
    CargoFailed {
        /// The packages asked for.
        packages: Vec<String>,
        /// Cargo's exit status.
        status: std::process::ExitStatus,
    },
    /// `cargo build` produced no executable for a package.
    #[error("building static binaries: cargo reported no executable for package {package}")]
    NoExecutable {
        /// The package without a binary.
        package: String,
    },
    /// A built binary is dynamically linked after all.
    #[error("building static binaries: {path} is dynamically linked (has an ELF interpreter)")]
    NotStatic {
        /// The offending binary.
        path: PathBuf,
    },
    /// Reading a file to check its ELF headers failed.
    #[error("reading ELF headers of {path}")]
    ElfRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}
