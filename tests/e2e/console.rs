//! The operator console (`/ui/`), driven by a real headless Chromium
//! through WebDriver: it logs in with the operator key, checks each page's
//! rows against the native API's answers (read with the operator key),
//! checks the spend chart's bars against the journal's charges, adds credits
//! (once, however often a form is sent), and saves a screenshot of each page
//! under target/console-screenshots/.

use crate::server::{Server, http};
use crate::support::*;
use crate::webdriver::Browser;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

fn screenshots() -> PathBuf {
    repo_root().join("target/console-screenshots")
}

/// A served home with a failing-over profile and a rejected extension.
fn console_home() -> TestHome {
    let home = TestHome::new()
        .with_saas_stub()
        .with_shipped_profiles()
        .with_shared_cache();
    install(
        &built_fixtures(),
        "always-unavailable",
        &home.extensions(),
        "always-unavailable",
    );
    // A component of another world: listed as rejected, with its reason.
    install(
        &built_fixtures(),
        "other-world",
        &home.extensions(),
        "other-world",
    );
    std::fs::write(
        home.profiles().join("fallback.toml"),
        "name = \"fallback\"\ndescription = \"cheapest first, falls back\"\n[sandbox]\nttl_secs = 300\n\
         [route]\nstrategy = \"lowest-cost\"\ncandidates = [\"always-unavailable\", \"saas-stub\"]\nfallback = true\n",
    )
    .unwrap();
    home
}

fn create(server: &Server, profile: &str, tenant: &str) -> String {
    let created = server
        .home
        .run(&[
            "sandbox",
            "create",
            "--profile",
            profile,
            "--tenant",
            tenant,
            "--ttl",
            "120",
            "--json",
        ])
        .ok()
        .json();
    created["id"].as_str().unwrap().to_string()
}

fn get(server: &Server, key: &str, path: &str) -> Value {
    let (status, _, body) = http("GET", &format!("{}{path}", server.url), Some(key), None);
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

fn text(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| "—".to_string(), str::to_string)
}

fn micros(amount: &str) -> u64 {
    if amount.trim_start_matches(['0', '.']).is_empty() {
        0
    } else {
        sandboxer_credits::parse_credits(amount).unwrap()
    }
}

#[test]
fn the_console_shows_what_the_api_answers_in_a_real_browser() {
    crate::webdriver::require_chromium();
    let server = Server::start(console_home());
    let key = server.operator_key();
    server.tenant("acme", "50");
    server.tenant("globex", "20");
    let billed_one = create(&server, "saas-stub", "acme");
    let billed_two = create(&server, "saas-stub", "acme");
    let failed_over = create(&server, "fallback", "globex");
    for id in [&billed_one, &billed_two, &failed_over] {
        server.home.run(&["sandbox", "destroy", id]).ok();
    }
    let live = create(&server, "saas-stub", "acme");
    let shots = screenshots();

    let browser = Browser::start(1280, 800);
    let ui = |path: &str| format!("{}{path}", server.url);

    // Not signed in: every page leads to the login form. A wrong key shows
    // it again with the reason.
    browser.goto(&ui("/ui/sandboxes"));
    assert!(browser.url().ends_with("/ui/login"), "{}", browser.url());
    browser.type_into("#key", "sk-operator-not-the-key");
    browser.click_and_wait("#login");
    assert!(browser.url().ends_with("/ui/login"), "{}", browser.url());
    let refusal = browser.text("#notice");
    assert!(
        refusal.contains("Wrong key: that is not the operator key"),
        "{refusal}"
    );
    browser.screenshot(&shots.join("login-wrong-key.png"));
    let tenant_key = server.tenant("initech", "1");
    browser.type_into("#key", &tenant_key);
    browser.click_and_wait("#login");
    assert!(
        browser
            .text("#notice")
            .contains("That is a tenant's key: the console needs the operator key"),
    );

    // The operator key opens the console; the key is in no URL, and the
    // browser holds only an HttpOnly, SameSite=Strict session cookie.
    browser.type_into("#key", &key);
    browser.click_and_wait("#login");
    assert!(
        browser.url().ends_with("/ui/sandboxes"),
        "{}",
        browser.url()
    );
    assert!(!browser.url().contains(&key));
    let cookies = browser.cookies();
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    assert_eq!(cookies[0]["name"], "sandboxer_console");
    assert_eq!(cookies[0]["httpOnly"], true);
    assert_eq!(cookies[0]["sameSite"], "Strict");
    assert!(!cookies[0]["value"].as_str().unwrap().contains(&key));

    // Sandboxes: the same records as the API, newest first.
    let listed = get(&server, &key, "/api/v1/sandboxes?all=true");
    let expected: Vec<Vec<String>> = listed
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|view| {
            vec![
                text(&view["id"]),
                text(&view["state"]),
                text(&view["tenant"]),
                text(&view["profile"]),
                text(&view["extension"]),
                text(&view["created_at"]),
                text(&view["meter"]["estimate"]),
                text(&view["meter"]["actual"]),
                text(&view["meter"]["drift"]),
            ]
        })
        .collect();
    assert_eq!(browser.rows("#sandboxes"), expected);
    assert_eq!(expected.len(), 4);
    browser.screenshot(&shots.join("sandboxes.png"));

    // Filtered by tenant, and live only.
    browser.goto(&ui("/ui/sandboxes?tenant=globex"));
    let ids: Vec<String> = browser
        .rows("#sandboxes")
        .into_iter()
        .map(|row| row[0].clone())
        .collect();
    assert_eq!(ids, vec![failed_over.clone()]);
    browser.goto(&ui("/ui/sandboxes?live=1"));
    let live_api = get(&server, &key, "/api/v1/sandboxes");
    let live_ids: Vec<String> = browser
        .rows("#sandboxes")
        .into_iter()
        .map(|row| row[0].clone())
        .collect();
    assert_eq!(live_ids, vec![live.clone()]);
    assert_eq!(live_api.as_array().unwrap().len(), 1);

    // The failed-over sandbox's record: both attempts, the meter.
    browser.goto(&ui(&format!("/ui/sandboxes/{failed_over}")));
    let record = get(&server, &key, &format!("/api/v1/sandboxes/{failed_over}"));
    let attempts: Vec<Vec<String>> = record["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|attempt| {
            vec![
                text(&attempt["extension"]),
                text(&attempt["hold_id"]),
                text(&attempt["estimate"]),
                text(&attempt["outcome"]),
            ]
        })
        .collect();
    assert_eq!(browser.rows("#attempts"), attempts);
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0][0], "always-unavailable");
    assert_eq!(attempts[1][0], "saas-stub");
    let facts = browser.text("main");
    for field in ["estimate", "hold", "actual", "drift"] {
        let value = text(&record["meter"][field]);
        assert!(facts.contains(&value), "{field} {value} not in {facts}");
    }
    browser.screenshot(&shots.join("sandbox.png"));

    // Tenants: every tenant's credits, as the API lists them.
    browser.goto(&ui("/ui/tenants"));
    let credits = get(&server, &key, "/api/v1/credits");
    let expected: Vec<Vec<String>> = credits
        .as_array()
        .unwrap()
        .iter()
        .map(|view| {
            vec![
                text(&view["tenant"]),
                text(&view["balance"]),
                text(&view["held"]),
                text(&view["available"]),
            ]
        })
        .collect();
    let shown: Vec<Vec<String>> = browser
        .rows("#tenants")
        .into_iter()
        .map(|row| row[..4].to_vec())
        .collect();
    assert_eq!(shown, expected);
    assert!(shown.iter().any(|row| row[0] == "acme"));
    browser.screenshot(&shots.join("tenants.png"));

    // A tenant's spend chart, per minute: each bar is the sum of the
    // journal's charges in its minute.
    browser.goto(&ui("/ui/tenants/acme?bucket=60"));
    let history = get(&server, &key, "/api/v1/credits/acme/history?limit=1000");
    let mut sums: BTreeMap<String, u64> = BTreeMap::new();
    for entry in history.as_array().unwrap() {
        if entry["kind"] != "charge" {
            continue;
        }
        let time = humantime::parse_rfc3339(entry["time"].as_str().unwrap()).unwrap();
        let ms = time.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        let start =
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms - ms % 60_000))
                .to_string();
        *sums.entry(start).or_default() += micros(entry["amount"].as_str().unwrap());
    }
    assert!(!sums.is_empty(), "acme was charged");
    let starts = browser.attributes("#spend-chart rect.bar", "data-start");
    let charged = browser.attributes("#spend-chart rect.bar", "data-charged");
    let bars: BTreeMap<String, u64> = starts
        .into_iter()
        .zip(charged.iter().map(|amount| micros(amount)))
        .filter(|(_, amount)| *amount > 0)
        .collect();
    assert_eq!(bars, sums);
    let history_rows = browser.rows("#history");
    assert_eq!(history_rows.len(), history.as_array().unwrap().len());
    assert_eq!(history_rows[0][0], history[0]["seq"].to_string());
    browser.screenshot(&shots.join("tenant.png"));

    // Adding credits: the form adds once; the same submission sent twice
    // adds nothing the second time; a bad amount is refused with the CLI's
    // message; a form without the session's token changes nothing.
    let before = micros(
        get(&server, &key, "/api/v1/credits/acme")["balance"]
            .as_str()
            .unwrap(),
    );
    browser.type_into("#amount", "5");
    browser.click_and_wait("#add-credits");
    let added = browser.text("#notice");
    assert!(
        added.starts_with("Added 5.000000 credits to acme"),
        "{added}"
    );
    let twice = browser.script(
        "const form = document.querySelector('form.add-credits');\
         form.amount.value = '2';\
         const body = new URLSearchParams(new FormData(form));\
         const send = () => fetch(form.action, {method: 'POST', body: body})\
             .then(response => response.text())\
             .then(html => new DOMParser().parseFromString(html, 'text/html')\
                 .getElementById('notice').textContent);\
         return send().then(first => send().then(second => [first, second]));",
        json!([]),
    );
    assert!(
        twice[0].as_str().unwrap().starts_with("Added 2.000000"),
        "{twice}"
    );
    assert!(
        twice[1]
            .as_str()
            .unwrap()
            .starts_with("This form was already submitted"),
        "{twice}"
    );
    browser.type_into("#amount", "-3");
    browser.click_and_wait("#add-credits");
    let refused = browser.text("#notice");
    assert!(refused.starts_with("Nothing added: "), "{refused}");
    let forged = browser.script(
        "const form = document.querySelector('form.add-credits');\
         form.amount.value = '100'; form.csrf.value = 'forged';\
         return fetch(form.action, {method: 'POST', body: new URLSearchParams(new FormData(form))})\
             .then(response => response.status);",
        json!([]),
    );
    assert_eq!(forged, 403);
    let after = micros(
        get(&server, &key, "/api/v1/credits/acme")["balance"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(after, before + 7_000_000);

    // Extensions: loaded and rejected, with breaker, latency and drift as
    // the API reports them.
    browser.goto(&ui("/ui/extensions"));
    let listings = get(&server, &key, "/api/v1/extensions");
    let rows = browser.rows("#extensions");
    assert_eq!(rows.len(), listings.as_array().unwrap().len());
    for (row, listing) in rows.iter().zip(listings.as_array().unwrap()) {
        let name = listing["name"].as_str().unwrap();
        let report = get(&server, &key, &format!("/api/v1/extensions/{name}"));
        assert_eq!(row[0], name);
        assert_eq!(row[1], text(&listing["status"]));
        assert_eq!(row[4], text(&listing["reason"]));
        assert!(row[5].starts_with(report["breaker"]["state"].as_str().unwrap()));
        assert_eq!(row[7], report["drift"]["sandboxes"].to_string());
        assert_eq!(row[8], text(&report["drift"]["estimated"]));
        assert_eq!(row[9], text(&report["drift"]["charged"]));
        assert_eq!(row[10], text(&report["drift"]["drift"]));
    }
    let rejected = rows.iter().find(|row| row[0] == "other-world").unwrap();
    assert_eq!(rejected[1], "rejected");
    assert!(rejected[4].len() > 10, "{rejected:?}");
    let stub = get(&server, &key, "/api/v1/extensions/saas-stub");
    assert_eq!(stub["drift"]["sandboxes"], 3);
    assert_eq!(
        browser.attributes(
            "#drift-chart rect.actual[data-sandbox='saas-stub']",
            "data-actual"
        ),
        vec![text(&stub["drift"]["charged"])]
    );
    browser.screenshot(&shots.join("extensions.png"));
    browser.goto(&ui("/ui/extensions/saas-stub"));
    let points: Vec<String> = stub["drift"]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|point| text(&point["actual"]))
        .collect();
    assert_eq!(
        browser.attributes("#drift-chart rect.actual[data-sandbox]", "data-actual"),
        points
    );
    browser.screenshot(&shots.join("extension.png"));

    // Routing: route explain's candidates for the picked profile.
    browser.goto(&ui("/ui/routing?profile=fallback"));
    let explain = get(&server, &key, "/api/v1/route/fallback");
    let candidates: Vec<(String, String)> = explain["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|candidate| {
            let eligible = if candidate["eligible"] == true {
                "yes"
            } else {
                "no"
            };
            (text(&candidate["name"]), eligible.to_string())
        })
        .collect();
    let shown: Vec<(String, String)> = browser
        .rows("#candidates")
        .into_iter()
        .map(|row| (row[0].clone(), row[3].clone()))
        .collect();
    assert_eq!(shown, candidates);
    assert_eq!(browser.text("#chosen"), text(&explain["chosen"]));
    browser.screenshot(&shots.join("routing.png"));

    // Events: the stream, read with the session cookie, fills the table.
    browser.goto(&ui("/ui/events"));
    browser.wait_for(
        "the failed-over sandbox's events",
        &format!(
            "return Array.from(document.querySelectorAll('#events tbody tr'))\
             .some(row => row.textContent.includes('{failed_over}') \
                 && row.textContent.includes('sandboxer.credits.charged'));"
        ),
    );
    let types: BTreeSet<String> = browser
        .rows("#events")
        .into_iter()
        .map(|row| row[1].clone())
        .collect();
    assert!(types.contains("sandboxer.credits.granted"), "{types:?}");
    assert!(types.contains("sandboxer.credits.voided"), "{types:?}");
    // Live: a sandbox created now appears without a reload.
    let newest = create(&server, "saas-stub", "globex");
    browser.wait_for(
        "the new sandbox's events, live",
        &format!(
            "return Array.from(document.querySelectorAll('#events tbody tr'))\
             .some(row => row.textContent.includes('{newest}') \
                 && row.textContent.includes('sandboxer.sandbox.ready'));"
        ),
    );
    browser.screenshot(&shots.join("events.png"));

    // A phone's width: the page itself does not scroll sideways (wide
    // tables scroll inside their box).
    browser.resize(390, 844);
    browser.goto(&ui("/ui/sandboxes"));
    let fits = browser.script(
        "return document.documentElement.scrollWidth <= window.innerWidth;",
        json!([]),
    );
    assert_eq!(fits, true);
    browser.screenshot(&shots.join("sandboxes-phone.png"));
    browser.resize(1280, 800);

    // The session cookie reads the API but never writes through it: a POST
    // without the key is refused and adds nothing.
    let cookie_post = browser.script(
        "return fetch('/api/v1/credits/acme', {method: 'POST', \
             headers: {'content-type': 'application/json'}, body: '{\"amount\": \"100\"}'})\
             .then(response => response.status);",
        json!([]),
    );
    assert_eq!(cookie_post, 401);
    let balance = micros(
        get(&server, &key, "/api/v1/credits/acme")["balance"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(balance, after);

    // The views the console reads are the API's, with its refusals.
    let (status, _, body) = http(
        "GET",
        &format!("{}/api/v1/credits/acme/spend?bucket_secs=0", server.url),
        Some(&key),
        None,
    );
    assert_eq!(status, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("bucket_secs must be between 1 and"),
        "{body}"
    );
    let (status, _, body) = http(
        "GET",
        &format!("{}/api/v1/extensions/saas-stub", server.url),
        Some(&tenant_key),
        None,
    );
    assert_eq!(status, 403, "{body}");

    // Logging out ends the session: the pages lead to the login again, and
    // the API no longer takes the old cookie.
    browser.click_and_wait(".logout button");
    assert!(browser.url().ends_with("/ui/login"), "{}", browser.url());
    browser.goto(&ui("/ui/tenants"));
    assert!(browser.url().ends_with("/ui/login"), "{}", browser.url());
    let status = browser.script(
        "return fetch('/api/v1/sandboxes').then(response => response.status);",
        json!([]),
    );
    assert_eq!(status, 401);
}
