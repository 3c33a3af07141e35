//! astolfomix_rs: merge dozens of safetensors checkpoints at the speed of the memory system.
//!
//! The crate is plain Rust (testable with `cargo test`); the Python bindings live in `py.rs`
//! behind the `python` feature. Work is described as a [`plan::Plan`] and run by
//! [`engine::execute`], which streams through the one [`writer::Writer`].

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod checkpoint;
pub mod dropout;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod guard;
pub mod hashing;
pub mod header;
pub mod iso;
pub mod kernels;
pub mod plan;
pub mod real;
pub mod robust;
pub mod writer;

#[cfg(feature = "python")]
mod py;

#[cfg(test)]
mod testutil;

pub use checkpoint::Checkpoint;
pub use dtype::Dtype;
pub use error::{Error, Result};
