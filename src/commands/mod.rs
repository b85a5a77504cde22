//! The subcommands' user interfaces, in one place: arguments, output and exit codes of
//! `trimrun trim`, `trimrun status` and `trimrun ctl`. The pool itself is
//! [`crate::run_pool`]; the work is done by [`crate::trim`] and [`crate::status`].

pub mod status;
pub mod trim;
