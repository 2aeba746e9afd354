//! The balloon's error type.

/// Everything that can go wrong in the balloon.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BalloonError {
    /// Pages could not be given back to the host.
    #[error("cannot discard guest range {gpa:#x}+{len:#x}")]
    Discard {
        /// First guest-physical address.
        gpa: u64,
        /// Length in bytes.
        len: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Deflated pages could not be made resident ahead of the guest.
    #[error("cannot pre-fault guest range {gpa:#x}+{len:#x}")]
    Populate {
        /// First guest-physical address.
        gpa: u64,
        /// Length in bytes.
        len: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A saved state cannot be restored.
    #[error("balloon state refused: {0}")]
    State(String),
    /// A target larger than the guest's memory.
    #[error("balloon target of {target_mib} MiB exceeds the guest's {memory_mib} MiB")]
    TargetTooLarge {
        /// The requested target.
        target_mib: u64,
        /// Guest RAM.
        memory_mib: u64,
    },
    /// A forecast or limits that the policy cannot use.
    #[error("invalid balloon policy input: {0}")]
    Policy(String),
}
