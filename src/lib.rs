//! trimrun: a process-pool launcher for memory-bound Python web apps.
//!
//! It forks N workers on shared listening sockets, gives each its own memory cgroup,
//! trims them from the outside (`malloc_trim(0)` injected through ptrace) as they approach
//! their limit, and recycles them one at a time, replacement first, with jitter.
//!
//! The shape (see `DESIGN.md`): pure decisions in [`policy`], [`size`] and the parsers;
//! thin kernel layers in [`spawn`], [`sockets`], [`cgroup`] and [`trim`]; one task that
//! owns the pool in [`supervisor`].

pub mod cgroup;
pub mod policy;
pub mod size;
pub mod status;
pub mod trim;
