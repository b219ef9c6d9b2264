//! One cgroup per sandbox, so that its memory, process and CPU limits hold
//! for the whole process tree instead of for each process.
//!
//! Where it lives:
//! - **cgroup v2** (the unified hierarchy, when it offers the `memory`,
//!   `pids` and `cpu` controllers): `<cgroup2 mount>/sandboxer/<sandbox id>`,
//!   with `memory.max`, `memory.swap.max = 0`, `pids.max` and `cpu.max`. It
//!   sits at the top because v2 lets only a cgroup without processes of its
//!   own hand controllers down, and the host's own cgroup has processes.
//! - **cgroup v1** (the `memory`, `pids` and `cpu` hierarchies mounted
//!   separately, as on hybrid systems): `<mount>/<own cgroup>/sandboxer/<id>`
//!   in each, under the supervisor's own cgroup so a limit put on the host
//!   still covers its sandboxes.
//!
//! Making a cgroup needs write access to those directories, which in practice
//! means root (or a delegated subtree). When none can be made, the supervisor
//! falls back to per-process resource limits, and [`Enforcement`] records
//! which applied. Nothing here runs inside the host: the supervisor and the
//! `sandbox exec` helper use it.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How a sandbox's tree is held to its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcement {
    CgroupV2,
    CgroupV1,
    Rlimits,
}

impl Enforcement {
    pub fn name(self) -> &'static str {
        match self {
            Self::CgroupV2 => "cgroup-v2",
            Self::CgroupV1 => "cgroup-v1",
            Self::Rlimits => "rlimits",
        }
    }
}

/// What a sandbox's cgroup limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_mb: u32,
    pub max_processes: u32,
    /// Thousandths of a vCPU; 0 for no bandwidth limit.
    pub cpu_millis: u32,
}

/// A sandbox's cgroup: one directory (v2) or one per controller (v1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxCgroup {
    pub version: Enforcement,
    pub dirs: Vec<PathBuf>,
}

/// The period `cpu.max` and `cpu.cfs_quota_us` are expressed against.
const CPU_PERIOD_MICROS: u64 = 100_000;
/// The controllers a sandbox's cgroup needs.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// Where cgroup hierarchies are mounted, from `/proc/self/mountinfo`.
struct Mounts {
    unified: Option<PathBuf>,
    /// (controller, mount point) for the v1 hierarchies we use.
    v1: Vec<(String, PathBuf)>,
}

fn mounts() -> Mounts {
    let mut found = Mounts {
        unified: None,
        v1: Vec::new(),
    };
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return found;
    };
    for line in text.lines() {
        // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER_OPTIONS`
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = before.split(' ').nth(4).map(PathBuf::from);
        let mut after = after.split(' ');
        let (fs_type, super_options) = (after.next(), after.nth(1).unwrap_or(""));
        match (fs_type, mount_point) {
            (Some("cgroup2"), Some(point)) => found.unified = found.unified.or(Some(point)),
            (Some("cgroup"), Some(point)) => {
                for option in super_options.split(',') {
                    if CONTROLLERS.contains(&option) {
                        found.v1.push((option.to_string(), point.clone()));
                    }
                }
            }
            _ => {}
        }
    }
    found
}

/// This process's cgroup in the v1 hierarchy of `controller`, from
/// `/proc/self/cgroup` (`N:memory:/path`).
fn own_v1_path(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        controllers
            .split(',')
            .any(|name| name == controller)
            .then(|| path.trim_start_matches('/').to_string())
    })
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value)
        .map_err(|error| format!("cannot write {value:?} to {}: {error}", path.display()))
}

fn make_dir(path: &Path) -> Result<(), String> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(format!("cannot create {}: {error}", path.display())),
    }
}

impl SandboxCgroup {
    /// Makes the cgroup of `sandbox_id` with `limits`, in v2 when it offers
    /// the controllers, else in v1. The error says why neither could be
    /// used; the caller then falls back to resource limits.
    pub fn create(sandbox_id: &str, limits: CgroupLimits) -> Result<Self, String> {
        let mounts = mounts();
        let mut reasons = Vec::new();
        if let Some(unified) = &mounts.unified {
            match Self::create_v2(unified, sandbox_id, limits) {
                Ok(cgroup) => return Ok(cgroup),
                Err(reason) => reasons.push(format!("v2: {reason}")),
            }
        }
        if !mounts.v1.is_empty() {
            match Self::create_v1(&mounts.v1, sandbox_id, limits) {
                Ok(cgroup) => return Ok(cgroup),
                Err(reason) => reasons.push(format!("v1: {reason}")),
            }
        }
        if reasons.is_empty() {
            reasons.push("no cgroup file system is mounted".into());
        }
        Err(reasons.join("; "))
    }

    fn create_v2(mount: &Path, sandbox_id: &str, limits: CgroupLimits) -> Result<Self, String> {
        let available = std::fs::read_to_string(mount.join("cgroup.controllers"))
            .map_err(|error| format!("cannot read its controllers: {error}"))?;
        let missing: Vec<&str> = CONTROLLERS
            .into_iter()
            .filter(|wanted| !available.split_whitespace().any(|name| name == *wanted))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "the unified hierarchy lacks the {} controller(s) (they may be bound to v1)",
                missing.join(", ")
            ));
        }
        let enable = "+memory +pids +cpu";
        let parent = mount.join("sandboxer");
        write(&mount.join("cgroup.subtree_control"), enable)?;
        make_dir(&parent)?;
        write(&parent.join("cgroup.subtree_control"), enable)?;
        let dir = parent.join(sandbox_id);
        make_dir(&dir)?;
        let cgroup = Self {
            version: Enforcement::CgroupV2,
            dirs: vec![dir.clone()],
        };
        let applied = (|| {
            write(
                &dir.join("memory.max"),
                &(u64::from(limits.memory_mb) << 20).to_string(),
            )?;
            if dir.join("memory.swap.max").exists() {
                write(&dir.join("memory.swap.max"), "0")?;
            }
            write(
                &dir.join("pids.max"),
                &limits.max_processes.max(1).to_string(),
            )?;
            if limits.cpu_millis > 0 {
                let quota = u64::from(limits.cpu_millis) * CPU_PERIOD_MICROS / 1000;
                write(
                    &dir.join("cpu.max"),
                    &format!("{} {CPU_PERIOD_MICROS}", quota.max(1000)),
                )?;
            }
            Ok::<(), String>(())
        })();
        applied.inspect_err(|_| cgroup.remove())?;
        Ok(cgroup)
    }

    fn create_v1(
        hierarchies: &[(String, PathBuf)],
        sandbox_id: &str,
        limits: CgroupLimits,
    ) -> Result<Self, String> {
        let mut cgroup = Self {
            version: Enforcement::CgroupV1,
            dirs: Vec::new(),
        };
        let made = (|| {
            for controller in CONTROLLERS {
                let (_, mount) = hierarchies
                    .iter()
                    .find(|(name, _)| name == controller)
                    .ok_or_else(|| format!("no {controller} hierarchy is mounted"))?;
                let own = own_v1_path(controller).unwrap_or_default();
                let parent = mount.join(own).join("sandboxer");
                std::fs::create_dir_all(&parent)
                    .map_err(|error| format!("cannot create {}: {error}", parent.display()))?;
                let dir = parent.join(sandbox_id);
                make_dir(&dir)?;
                cgroup.dirs.push(dir.clone());
                match controller {
                    "memory" => {
                        let bytes = (u64::from(limits.memory_mb) << 20).to_string();
                        write(&dir.join("memory.limit_in_bytes"), &bytes)?;
                        // Memory plus swap: the same, so swap adds nothing.
                        let with_swap = dir.join("memory.memsw.limit_in_bytes");
                        if with_swap.exists() {
                            write(&with_swap, &bytes)?;
                        }
                    }
                    "pids" => write(
                        &dir.join("pids.max"),
                        &limits.max_processes.max(1).to_string(),
                    )?,
                    _ if limits.cpu_millis > 0 => {
                        let quota = u64::from(limits.cpu_millis) * CPU_PERIOD_MICROS / 1000;
                        write(
                            &dir.join("cpu.cfs_period_us"),
                            &CPU_PERIOD_MICROS.to_string(),
                        )?;
                        write(&dir.join("cpu.cfs_quota_us"), &quota.max(1000).to_string())?;
                    }
                    _ => {}
                }
            }
            Ok::<_, String>(())
        })();
        if let Err(reason) = made {
            cgroup.remove();
            return Err(reason);
        }
        Ok(cgroup)
    }

    /// The `cgroup.procs` file of each directory: writing `0` to each moves
    /// the writing process in (opened before a fork, written after it).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|dir| dir.join("cgroup.procs"))
            .collect()
    }

    /// Process ids in the cgroup (of its first directory: every process of
    /// a sandbox is in all of them).
    pub fn pids(&self) -> Vec<i32> {
        self.dirs
            .first()
            .and_then(|dir| std::fs::read_to_string(dir.join("cgroup.procs")).ok())
            .map(|text| text.lines().filter_map(|pid| pid.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Kills every process in the cgroup, including any that left the
    /// sandbox's process group.
    pub fn kill_all(&self) {
        if self.version == Enforcement::CgroupV2
            && let Some(dir) = self.dirs.first()
            && std::fs::write(dir.join("cgroup.kill"), "1").is_ok()
        {
            return;
        }
        // Without cgroup.kill: a few passes, for processes forked meanwhile.
        for _ in 0..10 {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                // SAFETY: sending a signal has no memory effects.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// The tree's peak memory, in bytes, when the kernel keeps it.
    pub fn peak_memory_bytes(&self) -> Option<u64> {
        let file = match self.version {
            Enforcement::CgroupV2 => "memory.peak",
            _ => "memory.max_usage_in_bytes",
        };
        self.memory_dir()
            .and_then(|dir| std::fs::read_to_string(dir.join(file)).ok())
            .and_then(|text| text.trim().parse().ok())
    }

    /// Whether the kernel killed a process at the memory limit.
    pub fn memory_limit_hit(&self) -> bool {
        let file = match self.version {
            Enforcement::CgroupV2 => "memory.events",
            _ => "memory.oom_control",
        };
        self.memory_dir()
            .and_then(|dir| std::fs::read_to_string(dir.join(file)).ok())
            .is_some_and(|text| {
                text.lines().any(|line| {
                    line.strip_prefix("oom_kill ")
                        .and_then(|count| count.trim().parse::<u64>().ok())
                        .is_some_and(|count| count > 0)
                })
            })
    }

    /// CPU time of the whole tree in milliseconds (v2 keeps it per cgroup;
    /// v1 keeps it in `cpuacct`, which a sandbox does not join).
    pub fn cpu_ms(&self) -> Option<u64> {
        if self.version != Enforcement::CgroupV2 {
            return None;
        }
        let text = std::fs::read_to_string(self.dirs.first()?.join("cpu.stat")).ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix("usage_usec "))
            .and_then(|micros| micros.trim().parse::<u64>().ok())
            .map(|micros| micros / 1000)
    }

    fn memory_dir(&self) -> Option<&PathBuf> {
        match self.version {
            Enforcement::CgroupV2 => self.dirs.first(),
            _ => self
                .dirs
                .iter()
                .find(|dir| dir.join("memory.limit_in_bytes").exists()),
        }
    }

    /// Removes the cgroup once its processes are gone (a cgroup with
    /// processes cannot be removed: it then stays until the next try).
    pub fn remove(&self) {
        for dir in &self.dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enforcement_names_are_what_status_and_show_print() {
        assert_eq!(Enforcement::CgroupV2.name(), "cgroup-v2");
        assert_eq!(
            serde_json::to_string(&Enforcement::Rlimits).unwrap(),
            "\"rlimits\""
        );
    }

    #[test]
    fn a_cgroup_that_is_plain_files_reports_its_peak_and_oom() {
        // The kernel's files are plain text: a directory of them stands in.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("memory.peak"), "1048576\n").unwrap();
        std::fs::write(
            dir.path().join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("cpu.stat"),
            "usage_usec 2500\nuser_usec 2000\n",
        )
        .unwrap();
        let cgroup = SandboxCgroup {
            version: Enforcement::CgroupV2,
            dirs: vec![dir.path().to_path_buf()],
        };
        assert_eq!(cgroup.peak_memory_bytes(), Some(1_048_576));
        assert!(cgroup.memory_limit_hit());
        assert_eq!(cgroup.cpu_ms(), Some(2));
    }
}
