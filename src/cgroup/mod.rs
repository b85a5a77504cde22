//! TEMPORARY STUB (replaced by the wt-cgroup merge).
#![allow(dead_code, unused_variables)]
use std::os::fd::OwnedFd;
use std::path::Path;
pub const MIN_WORKER_LIMIT: u64 = 32 << 20;
pub const SUPERVISOR_RESERVE: u64 = 64 << 20;
#[derive(Debug, Clone, Copy)]
pub enum Choice {
    Auto,
    V2,
    V1,
    None,
}
impl std::str::FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(Choice::None)
    }
}
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    V2,
    V1,
    None,
}
impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "none")
    }
}
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Usage {
    pub current: u64,
    pub anon: u64,
    pub file: u64,
    pub working_set: u64,
    pub peak: Option<u64>,
    pub oom_kills: u64,
    pub limit: Option<u64>,
    pub pids: Vec<i32>,
}
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CgroupError(String);
pub struct Manager;
impl Manager {
    pub fn setup(c: Choice) -> Result<Manager, CgroupError> {
        Ok(Manager)
    }
    pub fn kind(&self) -> Kind {
        Kind::None
    }
    pub fn reason(&self) -> &str {
        "stub"
    }
    pub fn available_memory(&self) -> Result<u64, CgroupError> {
        Ok(1 << 30)
    }
    pub fn create_worker(
        &self,
        slot: usize,
        generation: u64,
        limit: Option<u64>,
    ) -> Result<WorkerGroup, CgroupError> {
        Ok(WorkerGroup)
    }
    pub fn teardown(&self) {}
}
pub struct WorkerGroup;
impl WorkerGroup {
    pub fn name(&self) -> &str {
        ""
    }
    pub fn path(&self) -> Option<&Path> {
        None
    }
    pub fn open_procs(&self) -> Result<Option<OwnedFd>, CgroupError> {
        Ok(None)
    }
    pub fn usage(&self, root_pid: Option<i32>) -> Result<Usage, CgroupError> {
        Ok(Usage::default())
    }
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        Ok(0)
    }
    pub fn pids(&self, root_pid: Option<i32>) -> Result<Vec<i32>, CgroupError> {
        Ok(root_pid.into_iter().collect())
    }
    pub fn set_high(&self, bytes: Option<u64>) -> Result<(), CgroupError> {
        Ok(())
    }
    pub fn kill_all(&self, root_pid: Option<i32>) -> Result<(), CgroupError> {
        Ok(())
    }
    pub fn remove(&self) -> Result<(), CgroupError> {
        Ok(())
    }
}
pub fn auto_limit(available: u64, workers: usize, reserve: u64) -> Result<u64, CgroupError> {
    Ok((available - reserve) / workers as u64)
}
