//! Profiles: named sandbox recipes in `profiles/*.toml`, each a sandbox spec
//! plus a route (how to pick the backend).
//!
//! ```toml
//! name = "burst-sandbox"
//! description = "Run on this machine when possible, else on the SaaS stub"
//!
//! [sandbox]
//! template = "python"
//! cpu_millis = 1000
//! memory_mb = 512
//! ttl_secs = 300
//! command = ["python3", "-c", "print(42)"]
//! env = { GREETING = "hello" }
//! network = false                      # may the sandbox reach the network
//!
//! [route]
//! strategy = "prefer-self-hosted"      # explicit | prefer-self-hosted | lowest-cost | lowest-latency
//! candidates = ["local", "saas-stub"]  # instance names, in order of preference
//! max_cost = "0.5"                     # decimal credits for the whole ttl
//! fallback = true
//! ```
//!
//! Unknown keys and wrong types are errors naming the file, the line and the
//! key.

use crate::names::check_name;
use crate::toml_file::describe_toml_error;
use sandboxer_credits::parse_credits;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub const DEFAULT_TEMPLATE: &str = "base";
pub const DEFAULT_CPU_MILLIS: u32 = 1000;
pub const DEFAULT_MEMORY_MB: u32 = 1024;
pub const DEFAULT_TTL_SECS: u32 = 300;
/// The longest ttl a profile (or `--ttl`) may ask for: one day.
pub const MAX_TTL_SECS: u32 = 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The one instance named by `extension`.
    Explicit,
    /// Eligible self-hosted candidates in listed order, then SaaS ones.
    PreferSelfHosted,
    /// Cheapest estimate first; ties keep the listed order.
    LowestCost,
    /// Lowest observed time to ready first; ties keep the listed order.
    LowestLatency,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Self::Explicit => "explicit",
            Self::PreferSelfHosted => "prefer-self-hosted",
            Self::LowestCost => "lowest-cost",
            Self::LowestLatency => "lowest-latency",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a sandbox made from this profile looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxTemplate {
    pub template: String,
    pub cpu_millis: u32,
    pub memory_mb: u32,
    pub ttl_secs: u32,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Whether the sandbox may reach the network (default: no).
    pub network: bool,
}

/// How a profile picks its backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub strategy: Strategy,
    /// Instance names in order of preference (for `explicit`, the one).
    pub candidates: Vec<String>,
    /// The most the whole ttl may be estimated at, in micro-credits.
    pub max_cost: Option<u64>,
    /// Whether a retryable failure may move on to the next candidate.
    pub fallback: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub file: PathBuf,
    pub sandbox: SandboxTemplate,
    pub route: RouteSpec,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("no profile named `{name}` in {dir} (found: {found})")]
    NotFound {
        name: String,
        dir: String,
        found: String,
    },
    #[error("cannot read {file}: {message}")]
    Unreadable { file: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    name: Option<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    sandbox: SandboxFile,
    route: RouteFile,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SandboxFile {
    template: Option<String>,
    cpu_millis: Option<u32>,
    memory_mb: Option<u32>,
    ttl_secs: Option<u32>,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    network: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    strategy: Strategy,
    #[serde(default)]
    candidates: Vec<String>,
    extension: Option<String>,
    max_cost: Option<toml::Value>,
    fallback: Option<bool>,
}

impl Profile {
    /// Finds a profile by name in `profiles_dir`, or reads `argument` as a
    /// path when it names a file.
    pub fn find(argument: &str, profiles_dir: &Path) -> Result<Self, ProfileError> {
        let as_path = Path::new(argument);
        if argument.ends_with(".toml") || argument.contains('/') {
            if as_path.is_file() {
                return Self::load(as_path);
            }
            return Err(ProfileError::Unreadable {
                file: argument.into(),
                message: "no such file".into(),
            });
        }
        let path = profiles_dir.join(format!("{argument}.toml"));
        if path.is_file() {
            return Self::load(&path);
        }
        let found = available_profiles(profiles_dir);
        Err(ProfileError::NotFound {
            name: argument.into(),
            dir: profiles_dir.display().to_string(),
            found: if found.is_empty() {
                "none".into()
            } else {
                found.join(", ")
            },
        })
    }

    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|error| ProfileError::Unreadable {
            file: path.display().to_string(),
            message: error.to_string(),
        })?;
        Self::parse(&text, path)
    }

    /// Parses profile text; `path` names the file in errors and gives the
    /// default name (its stem).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ProfileError> {
        let invalid = |message: String| ProfileError::Invalid {
            file: path.display().to_string(),
            message,
        };
        let file: ProfileFile =
            toml::from_str(text).map_err(|error| invalid(describe_toml_error(text, &error)))?;
        let stem = path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = file.name.unwrap_or(stem);
        check_name("profile", &name)
            .map_err(|message| invalid(format!("key `name`: {message}")))?;

        let sandbox = SandboxTemplate {
            template: file
                .sandbox
                .template
                .unwrap_or_else(|| DEFAULT_TEMPLATE.into()),
            cpu_millis: file.sandbox.cpu_millis.unwrap_or(DEFAULT_CPU_MILLIS),
            memory_mb: file.sandbox.memory_mb.unwrap_or(DEFAULT_MEMORY_MB),
            ttl_secs: file.sandbox.ttl_secs.unwrap_or(DEFAULT_TTL_SECS),
            command: file.sandbox.command,
            env: file.sandbox.env,
            network: file.sandbox.network,
        };
        for (key, value) in [
            ("cpu_millis", sandbox.cpu_millis),
            ("memory_mb", sandbox.memory_mb),
            ("ttl_secs", sandbox.ttl_secs),
        ] {
            if value == 0 {
                return Err(invalid(format!("key `sandbox.{key}` must be above zero")));
            }
        }
        if sandbox.ttl_secs > MAX_TTL_SECS {
            return Err(invalid(format!(
                "key `sandbox.ttl_secs` is {}; the limit is {MAX_TTL_SECS} (one day)",
                sandbox.ttl_secs
            )));
        }

        let route = file.route;
        let candidates = match (route.strategy, route.extension) {
            (Strategy::Explicit, Some(extension)) => {
                if !route.candidates.is_empty() && route.candidates != [extension.clone()] {
                    return Err(invalid(
                        "key `route.candidates`: an explicit route names its one backend in `route.extension`; remove `candidates`".into(),
                    ));
                }
                vec![extension]
            }
            (Strategy::Explicit, None) => {
                return Err(invalid(
                    "key `route.extension` is required when `route.strategy` is \"explicit\""
                        .into(),
                ));
            }
            (strategy, Some(_)) => {
                return Err(invalid(format!(
                    "key `route.extension` only applies to the explicit strategy; list the backends of \"{strategy}\" in `route.candidates`"
                )));
            }
            (strategy, None) if route.candidates.is_empty() => {
                return Err(invalid(format!(
                    "key `route.candidates` must name at least one extension for \"{strategy}\""
                )));
            }
            (_, None) => route.candidates,
        };
        for (index, candidate) in candidates.iter().enumerate() {
            check_name("extension", candidate)
                .map_err(|message| invalid(format!("key `route.candidates`: {message}")))?;
            if candidates[..index].contains(candidate) {
                return Err(invalid(format!(
                    "key `route.candidates` lists `{candidate}` twice"
                )));
            }
        }
        let max_cost = match route.max_cost {
            None => None,
            Some(value) => {
                let text = match &value {
                    toml::Value::String(text) => text.clone(),
                    toml::Value::Integer(number) => number.to_string(),
                    toml::Value::Float(number) => number.to_string(),
                    other => {
                        return Err(invalid(format!(
                            "key `route.max_cost` must be decimal credits, not {}",
                            other.type_str()
                        )));
                    }
                };
                Some(
                    parse_credits(&text)
                        .map_err(|error| invalid(format!("key `route.max_cost`: {error}")))?,
                )
            }
        };

        Ok(Self {
            name,
            description: file.description,
            file: path.to_path_buf(),
            sandbox,
            route: RouteSpec {
                strategy: route.strategy,
                candidates,
                max_cost,
                fallback: route.fallback.unwrap_or(true),
            },
        })
    }
}

impl Profile {
    /// The spec a sandbox of this profile is created with; `ttl_secs`
    /// overrides the profile's ttl (as `run --ttl` does).
    pub fn spec(&self, sandbox_id: &str, ttl_secs: Option<u32>) -> crate::runtime::SandboxSpec {
        crate::runtime::SandboxSpec {
            sandbox_id: sandbox_id.into(),
            profile: self.name.clone(),
            template: self.sandbox.template.clone(),
            cpu_millis: self.sandbox.cpu_millis,
            memory_mb: self.sandbox.memory_mb,
            ttl_secs: ttl_secs.unwrap_or(self.sandbox.ttl_secs),
            command: self.sandbox.command.clone(),
            env: self
                .sandbox
                .env
                .iter()
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
            network: self.sandbox.network,
        }
    }
}

/// The profile names (file stems) in a directory, sorted.
pub fn available_profiles(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "toml")
        })
        .filter_map(|path| {
            path.file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    names
}
