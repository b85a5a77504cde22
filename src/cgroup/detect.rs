//! Where our cgroups are, and which backend can work here. Reads `/proc/self/mountinfo` and
//! `/proc/self/cgroup` (paths taken from [`Roots`], so tests use fixture trees), maps our
//! cgroup paths onto mount points, and checks controllers and writability.

use std::path::{Path, PathBuf};

use super::common;
use super::error::CgroupError;
use super::parse::{self, CgroupLine, Mount};

/// The files and directories detection and accounting read. [`Roots::system`] is the real
/// machine; tests build one over a temp dir.
#[derive(Debug, Clone)]
pub struct Roots {
    /// `/proc/self/mountinfo`
    pub mountinfo: PathBuf,
    /// `/proc/self/cgroup`
    pub self_cgroup: PathBuf,
    /// `/proc/meminfo`
    pub meminfo: PathBuf,
    /// `/proc` (process liveness, start times, smaps_rollup)
    pub proc: PathBuf,
    /// The pid in `trimrun-<pid>` and the process moved into `supervisor/` on v2.
    pub pid: i32,
    /// Optional suffix, `trimrun-<pid>-<instance>`, so several managers can live in one
    /// process (tests run in parallel threads).
    pub instance: Option<String>,
}

impl Roots {
    pub fn system() -> Roots {
        Roots {
            mountinfo: "/proc/self/mountinfo".into(),
            self_cgroup: "/proc/self/cgroup".into(),
            meminfo: "/proc/meminfo".into(),
            proc: "/proc".into(),
            pid: std::process::id() as i32,
            instance: None,
        }
    }

    /// The system's files, with an instance suffix for the group name.
    pub fn system_instance(instance: &str) -> Roots {
        Roots {
            instance: Some(instance.to_string()),
            ..Roots::system()
        }
    }

    /// `dir/mountinfo`, `dir/cgroup`, `dir/meminfo`; `/proc` for processes.
    pub fn fixture(dir: &Path) -> Roots {
        Roots {
            mountinfo: dir.join("mountinfo"),
            self_cgroup: dir.join("cgroup"),
            meminfo: dir.join("meminfo"),
            proc: "/proc".into(),
            pid: std::process::id() as i32,
            instance: None,
        }
    }

    pub fn group_name(&self) -> String {
        match &self.instance {
            Some(i) => format!("trimrun-{}-{i}", self.pid),
            None => format!("trimrun-{}", self.pid),
        }
    }
}

/// Our place in one hierarchy: the directory of our own cgroup, and the mount it is on.
#[derive(Debug, Clone)]
pub struct Place {
    pub dir: PathBuf,
    pub mount: Mount,
}

/// Both hierarchies as far as we can see them; readable does not mean usable.
#[derive(Debug, Clone, Default)]
pub struct Found {
    pub v2: Option<Place>,
    pub v2_missing: String,
    pub v1: Option<Place>,
    pub v1_missing: String,
}

/// Map a cgroup path from /proc/self/cgroup onto a directory through the mount whose root
/// contains it (the longest such root wins; a writable mount beats a read-only one).
fn place_on<'a>(path: &str, mounts: impl Iterator<Item = &'a Mount>) -> Option<Place> {
    let mut best: Option<(&Mount, &str)> = None;
    for m in mounts {
        let root = m.root.trim_end_matches('/');
        let rest = if root.is_empty() {
            Some(path)
        } else {
            path.strip_prefix(root)
                .filter(|r| r.is_empty() || r.starts_with('/'))
        };
        let Some(rest) = rest else { continue };
        let better = match best {
            None => true,
            Some((b, _)) => (m.root.len(), !m.read_only()) > (b.root.len(), !b.read_only()),
        };
        if better {
            best = Some((m, rest));
        }
    }
    best.map(|(m, rest)| {
        let rest = rest.trim_matches('/');
        Place {
            dir: if rest.is_empty() {
                m.mount_point.clone()
            } else {
                m.mount_point.join(rest)
            },
            mount: m.clone(),
        }
    })
}

pub fn discover(roots: &Roots) -> Result<Found, CgroupError> {
    let mounts = parse::parse_mountinfo(&common::read(&roots.mountinfo)?);
    let lines: Vec<CgroupLine> = parse::parse_proc_self_cgroup(&common::read(&roots.self_cgroup)?);
    let mut found = Found::default();

    let v2_mounts: Vec<&Mount> = mounts.iter().filter(|m| m.fstype == "cgroup2").collect();
    match lines
        .iter()
        .find(|l| l.hierarchy_id == 0 && l.controllers.is_empty())
    {
        _ if v2_mounts.is_empty() => found.v2_missing = "no cgroup2 filesystem is mounted".into(),
        None => found.v2_missing = "this process has no cgroup v2 path in /proc/self/cgroup".into(),
        Some(line) => match place_on(&line.path, v2_mounts.into_iter()) {
            Some(p) => found.v2 = Some(p),
            None => {
                found.v2_missing = format!(
                    "our cgroup v2 path {} is outside every mounted cgroup2 tree",
                    line.path
                )
            }
        },
    }

    let v1_mounts: Vec<&Mount> = mounts
        .iter()
        .filter(|m| m.fstype == "cgroup" && m.super_options.iter().any(|o| o == "memory"))
        .collect();
    match lines
        .iter()
        .find(|l| l.controllers.iter().any(|c| c == "memory"))
    {
        _ if v1_mounts.is_empty() => {
            found.v1_missing = "the cgroup v1 memory hierarchy is not mounted".into()
        }
        None => {
            found.v1_missing = "this process has no v1 memory cgroup in /proc/self/cgroup".into()
        }
        Some(line) => match place_on(&line.path, v1_mounts.into_iter()) {
            Some(p) => found.v1 = Some(p),
            None => {
                found.v1_missing = format!(
                    "our v1 memory cgroup {} is outside the mounted memory hierarchy",
                    line.path
                )
            }
        },
    }
    Ok(found)
}

/// Why a hierarchy cannot be used, as an error that carries its remedy.
fn unavailable(kind: &'static str, reason: &str) -> CgroupError {
    CgroupError::Unavailable {
        kind,
        reason: reason.to_string(),
        remedy: match kind {
            "v2" => "pass --cgroup auto, --cgroup v1 or --cgroup none",
            _ => "pass --cgroup auto, --cgroup v2 or --cgroup none",
        },
    }
}

fn check_writable(place: &Place, file: &str) -> Result<(), CgroupError> {
    if place.mount.read_only() {
        return Err(CgroupError::ReadOnly {
            op: "write to",
            path: place.dir.clone(),
        });
    }
    for p in [place.dir.clone(), place.dir.join(file)] {
        if let Err(e) = common::writable(&p) {
            return Err(match e.raw_os_error() {
                Some(libc::EROFS) => CgroupError::ReadOnly {
                    op: "write to",
                    path: p,
                },
                Some(libc::EACCES) | Some(libc::EPERM) => CgroupError::NotDelegated {
                    path: place.dir.clone(),
                    detail: if p == place.dir {
                        "no write access to it".to_string()
                    } else {
                        format!("no write access to its {file}")
                    },
                },
                _ => CgroupError::io("check write access to", &p, e),
            });
        }
    }
    Ok(())
}

/// Can v2 work: memory controller offered to our cgroup, and our cgroup writable?
pub fn check_v2(found: &Found) -> Result<&Place, CgroupError> {
    let Some(place) = &found.v2 else {
        return Err(unavailable("v2", &found.v2_missing));
    };
    let controllers_path = place.dir.join("cgroup.controllers");
    let controllers = common::read(&controllers_path)?;
    if !controllers.split_whitespace().any(|c| c == "memory") {
        return Err(CgroupError::NoMemoryController {
            path: place.dir.clone(),
            controllers: controllers.trim().to_string(),
        });
    }
    check_writable(place, "cgroup.procs")?;
    Ok(place)
}

/// Can v1 work: memory hierarchy mounted, our memory cgroup writable?
pub fn check_v1(found: &Found) -> Result<&Place, CgroupError> {
    let Some(place) = &found.v1 else {
        return Err(unavailable("v1", &found.v1_missing));
    };
    if !place.dir.join("memory.limit_in_bytes").exists() {
        return Err(unavailable(
            "v1",
            &format!("{} has no memory.limit_in_bytes", place.dir.display()),
        ));
    }
    check_writable(place, "cgroup.procs")?;
    Ok(place)
}

/// An error as a fact for the "why this backend" reason: without its trailing remedy
/// (the reason says what we found; remedies belong to errors).
pub fn brief(e: &CgroupError) -> String {
    let s = e.to_string();
    let has_remedy = !matches!(
        e,
        CgroupError::Io { remedy: "", .. } | CgroupError::Parse { .. }
    );
    match s.rfind(" (") {
        Some(i) if has_remedy && s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}
