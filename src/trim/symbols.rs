//! Finding `malloc_trim` in the *target's* libc: the libc mapping from `/proc/PID/maps`,
//! its ELF dynamic symbols read through `/proc/PID/root` (the target may live in another
//! mount namespace) or `/proc/PID/map_files` (the file may have been replaced since),
//! cached per (device, inode).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use object::{Object, ObjectSegment, ObjectSymbol};

use super::TrimError;
use super::procfs::MapEntry;

/// Functions whose `syscall` instruction may be re-entered through `restart_syscall`
/// while sleeping or polling (never a lock).
const RESTARTABLE: &[&str] = &[
    "clock_nanosleep",
    "__clock_nanosleep",
    "__clock_nanosleep_time64",
    "nanosleep",
    "__nanosleep",
    "poll",
    "__poll",
    "ppoll",
    "__ppoll",
];

/// What we keep of one libc file.
#[derive(Debug)]
struct ElfInfo {
    /// `st_value` of `malloc_trim`, if exported.
    malloc_trim: Option<u64>,
    /// Lowest PT_LOAD address, page aligned (0 for a shared library).
    first_vaddr: u64,
    /// (name, st_value, size) of the restartable functions.
    restartable: Vec<(&'static str, u64, u64)>,
    /// Address of `__restore_rt` (the one occurrence of its body in executable code).
    restore_rt: Result<u64, String>,
    /// The first bytes of `malloc_trim` in the file, to recognise it in the process.
    malloc_trim_code: [u8; CODE_CHECK],
}

/// How many bytes of `malloc_trim` are compared with the process's memory once the
/// thread is stopped (an exec since we resolved it would have replaced them).
pub const CODE_CHECK: usize = 16;

/// libc as mapped in one process.
#[derive(Debug, Clone)]
pub struct Libc {
    pub path: String,
    pub malloc_trim: u64,
    /// Where `__restore_rt` is in the process.
    pub restore_rt: u64,
    bias: u64,
    info: Arc<ElfInfo>,
}

impl Libc {
    /// The restartable libc function containing `ip`, if any.
    pub fn restartable_function_at(&self, ip: u64) -> Option<&'static str> {
        let off = ip.checked_sub(self.bias)?;
        self.info
            .restartable
            .iter()
            .find(|(_, start, size)| off >= *start && off < start + size.max(&1))
            .map(|(name, _, _)| *name)
    }

    /// The bytes the process must have at `malloc_trim` and at `__restore_rt`.
    pub fn expected_code(&self) -> ([u8; CODE_CHECK], [u8; 9]) {
        (self.info.malloc_trim_code, super::arch::RESTORE_RT_BODY)
    }
}

/// Parsed libc files by (device major, device minor, inode).
type Cache = Mutex<HashMap<(u32, u32, u64), Arc<ElfInfo>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Why this process has no usable `malloc_trim`, judged from its mappings alone.
pub fn allocator_problem(maps: &[MapEntry]) -> Option<String> {
    for m in maps {
        let Some(path) = m.path.as_deref() else {
            continue;
        };
        let name = file_name(path);
        for alloc in ["libjemalloc", "libtcmalloc", "libmimalloc"] {
            if name.starts_with(alloc) {
                return Some(format!(
                    "malloc is replaced by {name}; glibc's malloc_trim would not release its memory"
                ));
            }
        }
        if name.starts_with("ld-musl") || name.starts_with("libc.musl") {
            return Some("the process uses musl libc, which has no malloc_trim".into());
        }
    }
    None
}

/// The libc mapping at file offset 0 (glibc: `libc.so.6`, old `libc-2.x.so`).
pub fn find_libc(maps: &[MapEntry]) -> Option<&MapEntry> {
    maps.iter().find(|m| {
        m.offset == 0
            && m.path.as_deref().is_some_and(|p| {
                let n = file_name(p);
                n.starts_with("libc.so") || (n.starts_with("libc-") && n.ends_with(".so"))
            })
    })
}

/// No libc mapped yet in an image still being built: the moments after an execve, while
/// the kernel maps the program (the vDSO, which every x86-64 process gets, comes last) or
/// ld.so maps its libraries. A static program maps neither a loader nor libc, but has
/// its vDSO.
pub fn starting_up(maps: &[MapEntry]) -> bool {
    let named = |f: &dyn Fn(&str) -> bool| {
        maps.iter()
            .any(|m| m.path.as_deref().is_some_and(|p| f(file_name(p))))
    };
    find_libc(maps).is_none()
        && (named(&|n| n.starts_with("ld-linux") || is_old_ld(n)) || !named(&|n| n == "[vdso]"))
}

/// glibc's loader before 2.34 was also installed as `ld-2.NN.so`.
fn is_old_ld(name: &str) -> bool {
    name.strip_prefix("ld-2.")
        .is_some_and(|v| v.ends_with(".so"))
}

/// Resolve libc and `malloc_trim` in process `pid` with mappings `maps`.
pub fn resolve(pid: i32, view: i32, maps: &[MapEntry]) -> Result<Libc, TrimError> {
    if let Some(reason) = allocator_problem(maps) {
        return Err(TrimError::Unavailable { pid, reason });
    }
    let Some(m) = find_libc(maps) else {
        if starting_up(maps) {
            return Err(TrimError::Deferred {
                pid,
                reason: "the program is starting: its dynamic loader has not mapped libc \
                         yet (it just executed a new program)"
                    .into(),
            });
        }
        return Err(TrimError::Unavailable {
            pid,
            reason: "no glibc libc.so is mapped (statically linked or not glibc), so there is \
                     no malloc_trim to call"
                .into(),
        });
    };
    let path = m.path.clone().unwrap_or_default();
    let key = (m.dev.0, m.dev.1, m.inode);
    let cached = cache()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .cloned();
    let info = match cached {
        Some(i) => i,
        None => {
            let info = Arc::new(load(pid, view, m, &path)?);
            cache()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, info.clone());
            info
        }
    };
    let Some(off) = info.malloc_trim else {
        return Err(TrimError::Unavailable {
            pid,
            reason: format!("{path} does not export malloc_trim (not glibc?)"),
        });
    };
    let restore_rt = info
        .restore_rt
        .clone()
        .map_err(|reason| TrimError::Unavailable {
            pid,
            reason: format!("{path}: {reason}"),
        })?;
    let bias = m.start - info.first_vaddr;
    Ok(Libc {
        path,
        malloc_trim: bias + off,
        restore_rt: bias + restore_rt,
        bias,
        info,
    })
}

/// `_PyRuntime` (address, size) of a CPython executable or libpython file, if exported.
type PyCache = Mutex<HashMap<(u32, u32, u64), Option<(u64, u64, u64)>>>;

/// Where the interpreter's `_PyRuntime` (which holds the GIL's condition variable and
/// mutex in CPython 3.9-3.11, and the main interpreter's GIL in 3.12 and later) is in
/// process `pid`, if the process runs CPython: from the dynamic symbols of the mapped
/// `libpython3.*.so` or, for a statically linked interpreter (Debian's), the `python3.*`
/// executable.
pub fn python_runtime(pid: i32, view: i32, maps: &[MapEntry]) -> Option<std::ops::Range<u64>> {
    static CACHE: OnceLock<PyCache> = OnceLock::new();
    let is_python = |n: &str| {
        n.starts_with("libpython3")
            || (n.starts_with("python3") && !n.contains(".so") && !n.ends_with(".py"))
    };
    let mut seen = std::collections::HashSet::new();
    for m in maps.iter().filter(|m| m.offset == 0) {
        let Some(path) = m.path.as_deref() else {
            continue;
        };
        if !is_python(file_name(path)) || !seen.insert(m.inode) {
            continue;
        }
        let key = (m.dev.0, m.dev.1, m.inode);
        let cache = CACHE.get_or_init(Default::default);
        let cached = cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied();
        let found = match cached {
            Some(f) => f,
            None => {
                let f = read_mapped(pid, view, m)
                    .ok()
                    .and_then(|d| runtime_symbol(&d));
                cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, f);
                f
            }
        };
        if let Some((value, size, first_vaddr)) = found {
            let start = m.start - first_vaddr + value;
            return Some(start..start + size);
        }
    }
    None
}

fn runtime_symbol(data: &[u8]) -> Option<(u64, u64, u64)> {
    let file = object::File::parse(data).ok()?;
    let first_vaddr = file.segments().map(|s| s.address()).min().unwrap_or(0) & !0xfff;
    file.dynamic_symbols()
        .find(|s| s.is_definition() && s.name() == Ok("_PyRuntime") && s.size() > 0)
        .map(|s| (s.address(), s.size(), first_vaddr))
}

/// The bytes of the file mapped at `m`, checked to be the same inode.
fn read_mapped(pid: i32, view: i32, m: &MapEntry) -> std::io::Result<Vec<u8>> {
    let path = m.path.as_deref().unwrap_or_default();
    let mut last = std::io::Error::from(std::io::ErrorKind::NotFound);
    for candidate in [
        PathBuf::from(format!("{}{path}", root_of(pid, view))),
        PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end)),
    ] {
        match std::fs::metadata(&candidate) {
            Ok(md) if md.ino() == m.inode => return std::fs::read(&candidate),
            Ok(_) => {}
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// `/proc/PID/root` as seen through thread `view` (the main thread's is gone once it
/// exited).
fn root_of(pid: i32, view: i32) -> String {
    if view == pid {
        format!("/proc/{pid}/root")
    } else {
        format!("/proc/{pid}/task/{view}/root")
    }
}

/// Read and parse the mapped file, checking it is the same inode the process maps.
fn load(pid: i32, view: i32, m: &MapEntry, path: &str) -> Result<ElfInfo, TrimError> {
    let via_root = PathBuf::from(format!("{}{path}", root_of(pid, view)));
    let via_map_files = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
    let mut last_err = None;
    for candidate in [via_root, via_map_files] {
        match std::fs::read(&candidate) {
            Ok(data) => {
                let same = std::fs::metadata(&candidate)
                    .map(|md| md.ino() == m.inode)
                    .unwrap_or(false);
                if !same {
                    continue;
                }
                return parse_elf(&data).map_err(|e| TrimError::Unavailable {
                    pid,
                    reason: format!("cannot parse {path} as ELF: {e}"),
                });
            }
            Err(e) => last_err = Some((candidate, e)),
        }
    }
    match last_err {
        Some((p, e)) => Err(super::procfs::io_error(
            pid,
            "read the target's libc",
            &p,
            e,
        )),
        None => Err(TrimError::Unavailable {
            pid,
            reason: format!("{path} was replaced on disk since the process mapped it"),
        }),
    }
}

fn parse_elf(data: &[u8]) -> Result<ElfInfo, object::Error> {
    let file = object::File::parse(data)?;
    let first_vaddr = file.segments().map(|s| s.address()).min().unwrap_or(0) & !0xfff;
    let mut malloc_trim = None;
    let mut restartable = Vec::new();
    for sym in file.dynamic_symbols() {
        if !sym.is_definition() {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        if name == "malloc_trim" {
            malloc_trim = Some(sym.address());
        } else if let Some(n) = RESTARTABLE.iter().find(|n| **n == name) {
            restartable.push((*n, sym.address(), sym.size()));
        }
    }
    let mut malloc_trim_code = [0u8; CODE_CHECK];
    let mut restore_rt = Vec::new();
    for seg in file.segments() {
        let object::SegmentFlags::Elf { p_flags, .. } = seg.flags() else {
            continue;
        };
        if p_flags.0 & 1 == 0 {
            continue;
        }
        let Ok(data) = seg.data() else { continue };
        let body = &super::arch::RESTORE_RT_BODY;
        restore_rt.extend(
            data.windows(body.len())
                .enumerate()
                .filter(|(_, w)| w == body)
                .map(|(i, _)| seg.address() + i as u64),
        );
        if let Some(mt) = malloc_trim
            && mt >= seg.address()
            && mt + CODE_CHECK as u64 <= seg.address() + data.len() as u64
        {
            let o = (mt - seg.address()) as usize;
            malloc_trim_code.copy_from_slice(&data[o..o + CODE_CHECK]);
        }
    }
    let restore_rt = match restore_rt[..] {
        [one] => Ok(one),
        [] => Err("no __restore_rt (rt_sigreturn trampoline) found in its code".to_string()),
        ref many => Err(format!(
            "{} candidates for __restore_rt (rt_sigreturn trampoline) in its code, expected one",
            many.len()
        )),
    };
    Ok(ElfInfo {
        malloc_trim,
        first_vaddr,
        restartable,
        restore_rt,
        malloc_trim_code,
    })
}

#[cfg(test)]
mod tests {
    use super::super::procfs::parse_maps;
    use super::*;

    #[test]
    fn detects_replaced_allocators_and_musl() {
        let je = parse_maps(
            "7f00-8f00 r--p 00000000 fe:01 5 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n",
        );
        assert!(allocator_problem(&je).unwrap().contains("libjemalloc"));
        let musl = parse_maps("7f00-8f00 r--p 00000000 fe:01 5 /lib/ld-musl-x86_64.so.1\n");
        assert!(allocator_problem(&musl).unwrap().contains("musl"));
        let plain = parse_maps("7f00-8f00 r--p 00000000 fe:01 5 /lib/x86_64-linux-gnu/libc.so.6\n");
        assert_eq!(allocator_problem(&plain), None);
        assert_eq!(find_libc(&plain).unwrap().inode, 5);
        let old = parse_maps("7f00-8f00 r--p 00000000 fe:01 6 /lib/libc-2.31.so\n");
        assert!(find_libc(&old).is_some());
        let none = parse_maps("7f00-8f00 r--p 00000000 fe:01 6 /lib/libcrypt.so.1\n");
        assert!(find_libc(&none).is_none());
    }

    #[test]
    fn a_program_whose_loader_has_not_mapped_libc_yet_is_starting_up() {
        let early = parse_maps(
            "5600-5700 r--p 00000000 fe:01 9 /usr/bin/execer\n\
             7f00-8f00 r--p 00000000 fe:01 7 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\n",
        );
        assert!(starting_up(&early));
        let old = parse_maps("7f00-8f00 r--p 00000000 fe:01 7 /lib/ld-2.31.so\n");
        assert!(starting_up(&old));
        let r = resolve(1, 1, &early);
        assert!(matches!(r, Err(TrimError::Deferred { .. })), "{r:?}");
        // The kernel still mapping the program: no vDSO yet.
        let building = parse_maps(
            "5600-5700 r--p 00000000 fe:01 9 /usr/bin/execer\n\
             7ffc0000-7ffd0000 rw-p 00000000 00:00 0 [stack]\n",
        );
        assert!(starting_up(&building));
        // Static: no loader, no libc, its vDSO.
        let stat = parse_maps(
            "5600-5700 r--p 00000000 fe:01 9 /usr/bin/busybox\n\
             7ffd0000-7ffd2000 r-xp 00000000 00:00 0 [vdso]\n",
        );
        assert!(!starting_up(&stat));
        assert!(matches!(
            resolve(1, 1, &stat),
            Err(TrimError::Unavailable { .. })
        ));
        // Loaded: libc is there.
        let late = parse_maps(
            "7f00-8f00 r--p 00000000 fe:01 7 /lib64/ld-linux-x86-64.so.2\n\
             7e00-7f00 r--p 00000000 fe:01 5 /lib/x86_64-linux-gnu/libc.so.6\n",
        );
        assert!(!starting_up(&late));
    }

    #[test]
    fn finds_the_python_runtime_of_a_running_interpreter() {
        let Ok(mut child) = std::process::Command::new("python3")
            .args(["-c", "import sys; sys.stdin.read()"])
            .stdin(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("no python3: skipped");
            return;
        };
        let pid = child.id() as i32;
        let found = (0..200).find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            let maps = parse_maps(&std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?);
            python_runtime(pid, pid, &maps)
        });
        let _ = child.kill();
        let _ = child.wait();
        let r = found.expect("_PyRuntime of python3");
        assert!(r.end - r.start > 4096, "{r:?}");
        let own = parse_maps(&std::fs::read_to_string("/proc/self/maps").unwrap());
        let me = std::process::id() as i32;
        assert_eq!(python_runtime(me, me, &own), None);
    }

    #[test]
    fn finds_malloc_trim_in_this_systems_libc() {
        let maps = parse_maps(&std::fs::read_to_string("/proc/self/maps").unwrap());
        let me = std::process::id() as i32;
        let libc = resolve(me, me, &maps).unwrap();
        // SAFETY: dlsym on the default namespace with a valid C string.
        let ours = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"malloc_trim".as_ptr()) };
        assert_eq!(libc.malloc_trim, ours as u64);
        // __restore_rt: the restorer glibc's sigaction installs for every handler.
        // SAFETY: a null new action only reads the current one into `old`.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: sigaction with a null new action and a valid out pointer.
        unsafe {
            libc::signal(libc::SIGUSR2, libc::SIG_IGN);
            libc::sigaction(libc::SIGUSR2, std::ptr::null(), &mut old);
        }
        assert_eq!(
            libc.restore_rt,
            old.sa_restorer.map_or(0, |f| f as usize as u64)
        );
        let (mt, rt) = libc.expected_code();
        // SAFETY: both addresses are mapped code of our own libc, at least this long.
        unsafe {
            assert_eq!(std::slice::from_raw_parts(ours as *const u8, 16), &mt[..]);
            assert_eq!(
                std::slice::from_raw_parts(libc.restore_rt as *const u8, 9),
                &rt[..]
            );
        }
        // SAFETY: as above.
        let sleep = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"clock_nanosleep".as_ptr()) };
        assert_eq!(
            libc.restartable_function_at(sleep as u64 + 4),
            Some("clock_nanosleep")
        );
    }
}
