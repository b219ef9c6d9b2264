//! Golden tests of the profile format: every shipped profile parses, and
//! each malformed fixture in tests/fixtures/profiles/ gives exactly the
//! error text in its `.error` file (with the path shown as `<file>`).

use crate::support::repo_root;
use sandboxer_host::profile::{Profile, ProfileError, Strategy};

#[test]
fn every_shipped_profile_parses() {
    let dir = repo_root().join("profiles");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let profile = Profile::load(&path).unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(
            path.file_stem().unwrap().to_string_lossy(),
            profile.name,
            "a profile's name is its file stem"
        );
        assert!(
            !profile.description.is_empty(),
            "{} has a description",
            profile.name
        );
        names.push(profile.name);
    }
    names.sort();
    assert_eq!(names, ["burst-sandbox", "e2b", "local", "saas-stub"]);

    let burst = Profile::find("burst-sandbox", &dir).unwrap();
    assert_eq!(burst.route.strategy, Strategy::PreferSelfHosted);
    assert_eq!(burst.route.candidates, ["local", "saas-stub"]);
    let stub = Profile::find("saas-stub", &dir).unwrap();
    assert_eq!(
        (stub.route.strategy, stub.route.candidates.as_slice()),
        (Strategy::Explicit, ["saas-stub".to_string()].as_slice())
    );
    let e2b = Profile::find("e2b", &dir).unwrap();
    assert_eq!(e2b.route.candidates, ["e2b", "saas-stub"]);
    let local = Profile::find(dir.join("local.toml").to_str().unwrap(), &dir).unwrap();
    assert_eq!(local.route.candidates, ["local"]);
}

#[test]
fn each_malformed_profile_gives_its_expected_error() {
    let dir = repo_root().join("tests/fixtures/profiles");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|extension| extension != "toml") {
            continue;
        }
        let expected = std::fs::read_to_string(path.with_extension("error")).unwrap();
        let error = Profile::load(&path).expect_err(&format!("{} must not parse", path.display()));
        let shown = error
            .to_string()
            .replace(&path.display().to_string(), "<file>");
        assert_eq!(shown, expected.trim_end(), "{}", path.display());
        assert!(matches!(error, ProfileError::Invalid { .. }));
        checked += 1;
    }
    assert!(checked >= 9, "all fixtures were checked");
}

#[test]
fn a_missing_profile_lists_the_ones_there_are() {
    let error = Profile::find("nope", &repo_root().join("profiles")).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "no profile named `nope` in {} (found: burst-sandbox, e2b, local, saas-stub)",
            repo_root().join("profiles").display()
        )
    );
}
