//! Drover coordinator library.

pub mod pipeline;
