//! `ext new`: a new extension project that builds and passes `ext check`
//! unchanged, in Rust, Python or JavaScript.
//!
//! Each project carries its own copy of the WIT contract (so it builds
//! outside this repository), a small working backend (a per-second rate,
//! start times in the key-value store), a sidecar, and a README with the
//! build and check commands. The templates live in `host/templates/`.

use crate::names::check_name;
use std::path::{Path, PathBuf};

const WIT: &str = include_str!("../../wit/sandbox-extension.wit");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    Rust,
    Python,
    Js,
}

impl Language {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "rust" => Ok(Self::Rust),
            "python" => Ok(Self::Python),
            "js" | "javascript" => Ok(Self::Js),
            other => Err(format!(
                "unknown language {other:?}: use rust, python or js"
            )),
        }
    }

    /// How to build the project, and the component it produces.
    pub fn build_steps(self, name: &str) -> (Vec<&'static str>, String) {
        match self {
            Self::Rust => (
                vec![
                    "rustup target add wasm32-wasip2",
                    "cargo build --release --target wasm32-wasip2",
                ],
                format!(
                    "target/wasm32-wasip2/release/{}.wasm",
                    name.replace('-', "_")
                ),
            ),
            Self::Python => (
                vec![
                    "pip install -r requirements.txt",
                    "componentize-py -d wit -w sandbox-extension componentize app -o NAME.wasm",
                ],
                format!("{name}.wasm"),
            ),
            Self::Js => (vec!["npm install", "npm run build"], format!("{name}.wasm")),
        }
    }
}

/// The files of a new project, as (relative path, contents).
pub fn files(name: &str, language: Language) -> Result<Vec<(PathBuf, String)>, String> {
    check_name("extension", name)?;
    if !name.starts_with(|first: char| first.is_ascii_lowercase()) || name.contains('.') {
        return Err(format!(
            "extension name {name:?} must start with a lowercase letter and have no '.'"
        ));
    }
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{crate}}", &name.replace('-', "_"))
    };
    let mut files: Vec<(PathBuf, String)> = match language {
        Language::Rust => vec![
            (
                "Cargo.toml".into(),
                fill(include_str!("../templates/rust/Cargo.toml")),
            ),
            (
                "src/lib.rs".into(),
                fill(include_str!("../templates/rust/src/lib.rs")),
            ),
        ],
        Language::Python => vec![
            (
                "app.py".into(),
                fill(include_str!("../templates/python/app.py")),
            ),
            (
                "requirements.txt".into(),
                fill(include_str!("../templates/python/requirements.txt")),
            ),
        ],
        Language::Js => vec![
            (
                "backend.js".into(),
                fill(include_str!("../templates/js/backend.js")),
            ),
            (
                "package.json".into(),
                fill(include_str!("../templates/js/package.json")),
            ),
        ],
    };
    files.push(("wit/sandbox-extension.wit".into(), WIT.to_string()));
    files.push((
        format!("{name}.toml").into(),
        format!(
            "# Sidecar of the {name} instance: copy it next to {name}.wasm in the extensions directory.\n\
             # See docs/extensions.md for limits, grants and config.\n\n[config]\nrate_per_vcpu_second_micros = \"14\"\n"
        ),
    ));
    let (steps, output) = language.build_steps(name);
    let steps: Vec<String> = steps
        .iter()
        .map(|step| format!("    {}", step.replace("NAME", name)))
        .collect();
    files.push((
        "README.md".into(),
        format!(
            "# {name}\n\nA sandboxer backend extension.\n\nBuild:\n\n{}\n\nCheck and install:\n\n    sandboxer-host ext check {output}\n    cp {output} <extensions dir>/{name}.wasm\n    cp {name}.toml <extensions dir>/\n",
            steps.join("\n")
        ),
    ));
    Ok(files)
}

/// Writes a new project into `dir`, which must not exist yet.
pub fn create(dir: &Path, name: &str, language: Language) -> Result<Vec<PathBuf>, String> {
    if dir.exists() {
        return Err(format!(
            "{} already exists: pick another name or directory",
            dir.display()
        ));
    }
    let files = files(name, language)?;
    let mut written = Vec::new();
    for (relative, contents) in files {
        let path = dir.join(&relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|error| format!("cannot create {}: {error}", parent.display()))?;
        }
        std::fs::write(&path, contents)
            .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
        written.push(relative);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_language_gets_the_contract_a_sidecar_and_its_name() {
        for language in [Language::Rust, Language::Python, Language::Js] {
            let files = files("my-backend", language).unwrap();
            let names: Vec<String> = files
                .iter()
                .map(|(path, _)| path.display().to_string())
                .collect();
            assert!(
                names.contains(&"wit/sandbox-extension.wit".to_string()),
                "{names:?}"
            );
            assert!(names.contains(&"my-backend.toml".to_string()), "{names:?}");
            for (path, contents) in &files {
                assert!(
                    !contents.contains("{{"),
                    "{} has an unfilled placeholder",
                    path.display()
                );
            }
        }
    }

    #[test]
    fn bad_names_and_existing_directories_are_refused() {
        assert!(files("My Backend", Language::Rust).is_err());
        assert!(files("9lives", Language::Rust).is_err());
        assert!(
            Language::parse("cobol")
                .unwrap_err()
                .contains("rust, python or js")
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(
            create(dir.path(), "x", Language::Rust)
                .unwrap_err()
                .contains("already exists")
        );
    }
}
