//! The contract between a VMM and the Prescient companion.
