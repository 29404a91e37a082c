//! Synthetic abdominal CT phantom (being written).
