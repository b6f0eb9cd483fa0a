//! The attacker's corpus straight at a station's port (issue 18): the hub is bypassed, so
//! only the station's own check and release stand between a fragment and its data. The
//! same attacks through the hub are in `sql/policy/attacks.slt`. Each case asserts the
//! refusal's rule; none asserts a value.

use railyard::client::HubClient;

use crate::fixtures;
use crate::policy::lung_under_default_policy;

/// `n` CTEs over lung, each reading the one before, and `SELECT items` from the last.
fn cte_chain(n: usize, items: &str) -> String {
    let ctes: Vec<String> = (0..n)
        .map(|i| match i {
            0 => "t0 AS (SELECT * FROM lung)".to_string(),
            i => format!("t{i} AS (SELECT * FROM t{})", i - 1),
        })
        .collect();
    format!("WITH {} SELECT {items} FROM t{}", ctes.join(", "), n - 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacks_straight_at_a_station_are_refused_by_their_rule() {
    let (federation, _governance) = lung_under_default_policy().await;
    let url = &federation.stations[0].url;
    let sum = format!(
        "SELECT partial_sum({}) AS a0 FROM lung",
        vec!["age"; 2000].join(" + ")
    );
    let chain = format!(
        "SELECT partial_count(1) AS a0 FROM lung WHERE {}",
        vec!["age > 1"; 2000].join(" AND ")
    );
    let ctes = cte_chain(150, "partial_count(1) AS a0");
    let cases = [
        // One patient's exact value: TRY_CAST nulls every other row.
        (
            "SELECT partial_regr_avgx(TRY_CAST((patient_id - 1) * 200 AS TINYINT), age) AS a0 \
             FROM lung"
                .to_string(),
            "(rule aggregate_argument)",
        ),
        // k counts the contributors of each value, not the group's rows.
        (
            "SELECT partial_count(TRY_CAST((time - 306) * 200 AS TINYINT)) AS a0 FROM lung"
                .to_string(),
            "(rule min_group_size)",
        ),
        (
            "SELECT partial_count(x) AS a0 FROM (SELECT CASE WHEN patient_id = 1 THEN 1 END \
             AS x FROM lung)"
                .to_string(),
            "(rule min_group_size)",
        ),
        // The argument's lineage, not only the aggregate's direct argument.
        (
            "SELECT partial_sum(x) AS a0 FROM (SELECT CASE WHEN age >= 80 THEN 1 END AS x \
             FROM lung)"
                .to_string(),
            "(rule aggregate_argument)",
        ),
        (
            "SELECT partial_sum((time - 306 + 10000) / 10000) AS a0 FROM lung".to_string(),
            "(rule aggregate_argument)",
        ),
        // Failures as oracles.
        (
            "SELECT partial_count(1) AS a0 FROM lung WHERE length(substr('abcdefghij', 1, \
             CASE WHEN patient_id = 1 THEN age - 70 ELSE 1 END)) >= 0"
                .to_string(),
            "(rule fallible_expression)",
        ),
        (
            "SELECT partial_count(1) AS a0 FROM lung WHERE CASE WHEN patient_id = 1 AND \
             age >= 70 THEN 1/0 ELSE 1 END = 1"
                .to_string(),
            "(rule fallible_expression)",
        ),
        // Statements that used to overflow the stack and abort the process.
        (sum, "(rule query_too_complex)"),
        (chain, "(rule query_too_complex)"),
        // A chain of 150 CTEs: a plan that deep ran the stack out.
        (ctes, "(rule query_too_complex)"),
        // 200 bytes the SQL parser backtracks over 2^40 times: minutes of a core. Refused
        // by its steps or the stack it takes, whichever runs out first.
        (not_chain(40, "partial_count(1) AS a0"), "(limit max_parse_"),
        // Prefixes nested without parentheses or operators, past the parser's own
        // recursion counter: ran the stack out.
        (interval_chain(20_000), "max_parse_depth"),
    ];
    for (sql, rule) in &cases {
        let err = fixtures::run_at_station(url, sql)
            .await
            .expect_err("refused by the station itself");
        assert!(err.contains(rule), "{}: {err}", &sql[..sql.len().min(200)]);
        // A refusal never quotes a value of the data (patient 1 is 74 years old).
        assert!(!err.contains("74"), "{err}");
    }
    // The station is still up and answers research.
    let released = fixtures::run_at_station(url, "SELECT partial_avg(age) AS a0 FROM lung")
        .await
        .unwrap();
    assert_eq!(released.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
    federation.shutdown().await.unwrap();
}

/// `n` nested `NOT (`: when the parser's recursion limit stops the innermost, every level
/// is parsed again as a call of a function `not`, twice the work per level.
fn not_chain(n: usize, select: &str) -> String {
    format!(
        "SELECT {select} FROM lung WHERE {}age > 1{}",
        "NOT (".repeat(n),
        ")".repeat(n)
    )
}

/// `INTERVAL INTERVAL … '1'`: each word parses the next as a prefix, a level of the
/// parser's stack that no recursion counter sees.
fn interval_chain(n: usize) -> String {
    format!("SELECT {}'1' AS a0 FROM lung", "INTERVAL ".repeat(n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_statements_are_refused_by_the_hub_which_keeps_answering() {
    let (federation, _governance) = lung_under_default_policy().await;
    let mut client = HubClient::connect(&federation.hub_url).await.unwrap();
    for sql in [
        format!("SELECT {} FROM lung", vec!["age"; 2000].join(" + ")),
        format!(
            "SELECT count(*) FROM lung WHERE {}",
            vec!["age > 1"; 2000].join(" OR ")
        ),
    ] {
        let err = client
            .query(&sql)
            .await
            .expect_err("too complex")
            .to_string();
        assert!(err.contains("(rule query_too_complex)"), "{err}");
        assert!(err.contains("max_depth"), "{err}");
    }
    for (sql, limit) in [
        (not_chain(40, "count(*)"), "(limit max_parse_"),
        (not_chain(45, "count(*)"), "(limit max_parse_"),
        (interval_chain(20_000), "max_parse_depth"),
    ] {
        let err = client
            .query(&sql)
            .await
            .expect_err("too costly to parse")
            .to_string();
        assert!(err.contains("(rule query_too_complex)"), "{err}");
        assert!(err.contains(limit), "{err}");
    }
    // A chain of CTEs, each reading the one before, is as deep as it is long.
    let err = client
        .query(&cte_chain(150, "count(*)"))
        .await
        .expect_err("too many query blocks")
        .to_string();
    assert!(err.contains("max_query_blocks"), "{err}");
    // A query that grows past its memory budget fails alone, naming the limit; the hub
    // keeps answering.
    let err = client
        .query("SELECT length(string_agg(repeat('x', 30000), '')) FROM generate_series(1, 50000)")
        .await
        .expect_err("over the query's memory budget")
        .to_string();
    assert!(err.to_lowercase().contains("resources exhausted"), "{err}");
    // A batch of rows that would build more strings than an Arrow array holds is refused.
    let err = client
        .query("SELECT length(string_agg(repeat('x', 1000000), '')) FROM generate_series(1, 3000)")
        .await
        .expect_err("over the batch's string budget")
        .to_string();
    assert!(err.contains("max_string_bytes"), "{err}");
    // A long sum is still planned and answered (its fragment SQL, one pair of parentheses
    // per `+`, must stay within the SQL parser's nesting limit of 50).
    let sum = format!("SELECT sum({}) FROM lung", vec!["age"; 40].join(" + "));
    let answer = client.query(&sum).await.unwrap();
    assert_eq!(
        answer.batches.iter().map(|b| b.num_rows()).sum::<usize>(),
        1
    );
    federation.shutdown().await.unwrap();
}

/// A model round sent straight to the stations with coefficients chosen so that every row
/// but patient 1's weighs nothing: X'WX / ΣW would be that patient's exact values. The
/// station holding patient 1 refuses it by the dominance rule, whatever the coefficients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_round_with_chosen_coefficients_cannot_single_out_a_patient() {
    let (federation, _governance) = lung_under_default_policy().await;
    let attack = "SELECT glm_terms('binomial', true, status, patient_id, age, time, meal_cal, \
                  -40.0, 40.0, 0, 0, 0) AS a0 FROM lung";
    let mut refused = 0;
    for station in &federation.stations {
        // Elsewhere every row weighs the same (|η| is capped): nothing stands out, and the
        // round is answered.
        if let Err(err) = fixtures::run_at_station(&station.url, attack).await {
            assert!(err.contains("(rule model_dominance)"), "{err}");
            assert!(!err.contains("74"), "{err}");
            refused += 1;
        }
    }
    assert_eq!(refused, 1, "the station holding patient 1 refuses");
    // An honest first round (all coefficients 0) is answered everywhere.
    for station in &federation.stations {
        fixtures::run_at_station(
            &station.url,
            "SELECT glm_terms('gaussian', true, age, time, meal_cal, 0, 0, 0) AS a0 FROM lung",
        )
        .await
        .unwrap();
    }
    federation.shutdown().await.unwrap();
}

/// `railyard local`'s stations answer their own hub only: a ticket sent to a station's
/// loopback port without the hub's per-run secret (under any researcher name, for a fresh
/// DP budget, or for pseudonymized rows) is refused before it is planned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_stations_answer_only_their_hub() {
    let (federation, _governance) = lung_under_default_policy().await;
    let url = &federation.stations[0].url;
    let channel = tonic::transport::Endpoint::from_shared(url.replace("grpc://", "http://"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = arrow_flight::flight_service_client::FlightServiceClient::new(channel);
    for researcher in ["alice", "mallory-1", "mallory-2"] {
        let ticket = railyard_contract::FragmentTicket {
            query_id: "q".into(),
            fragment: 1,
            researcher: researcher.into(),
            collaboration: String::new(),
            epsilon: None,
            sql: "SELECT partial_count(1) AS a0 FROM lung".into(),
            train: None,
        };
        let mut wrong = tonic::Request::new(arrow_flight::Ticket::new(ticket.to_bytes()));
        wrong.metadata_mut().insert(
            railyard_contract::HUB_SECRET_HEADER,
            "guess".parse().unwrap(),
        );
        for request in [
            tonic::Request::new(arrow_flight::Ticket::new(ticket.to_bytes())),
            wrong,
        ] {
            let status = client.do_get(request).await.expect_err("not the hub");
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
            assert!(status.message().contains("(rule hub_only)"), "{status:?}");
        }
    }
    let listing = client
        .list_flights(arrow_flight::Criteria::default())
        .await
        .expect_err("not even the tables are listed");
    assert_eq!(listing.code(), tonic::Code::PermissionDenied);
    // The hub itself still answers.
    let mut hub = HubClient::connect(&federation.hub_url).await.unwrap();
    hub.query("SELECT count(*) FROM lung").await.unwrap();
    federation.shutdown().await.unwrap();
}
