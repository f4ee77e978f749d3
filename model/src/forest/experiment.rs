//! The compute-matched BTM experiment (filled in below).
