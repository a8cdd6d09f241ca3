//! placeholder
pub mod change;
