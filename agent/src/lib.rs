//! Drover agent library.
