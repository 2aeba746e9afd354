//! labvm: the reference VMM.
