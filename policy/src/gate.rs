//! The rules that gate a fragment on the station's own state rather than on its plan: a
//! DP budget and its ε limits, the trains the station runs, the collaboration secret it holds.
//! The station's I/O shell asks these; each refusal is built here, once.

use crate::file::DpPolicy;
use crate::rule::{Refusal, Rule};

/// A DP fragment at a station whose policy has no `[dp]` budget.
pub fn no_dp(station: &str) -> Refusal {
    Refusal {
        rule: Rule::Dp,
        message: format!(
            "policy: station '{station}' answers no differentially private aggregates (its \
             policy has no [dp] budget)"
        ),
    }
}

/// The ε a DP fragment costs: the researcher's choice (`SET railyard.epsilon`) or the
/// policy's default, refused unless it is above 0 and at most `dp.max_epsilon`.
pub fn query_epsilon(dp: &DpPolicy, station: &str, requested: Option<f64>) -> Result<f64, Refusal> {
    let epsilon = requested.unwrap_or(dp.epsilon);
    if epsilon.is_finite() && epsilon > 0.0 && epsilon <= dp.max_epsilon {
        return Ok(epsilon);
    }
    Err(Refusal {
        rule: Rule::DpEpsilon,
        message: format!(
            "policy: station '{station}' accepts a query ε above 0 and at most {} \
             (dp.max_epsilon)",
            dp.max_epsilon
        ),
    })
}

/// Whether spending `epsilon` on top of `spent` stays within `budget`, with slack for the
/// rounding of summed floats: twenty charges of 0.5 must fit a budget of 10 whatever the
/// rounding of their sum.
pub fn within_budget(spent: f64, epsilon: f64, budget: f64) -> bool {
    spent + epsilon <= budget + 1e-9
}

/// Who spends a DP budget, and on what.
#[derive(Debug, Clone, Copy)]
pub struct Spender<'a> {
    pub station: &'a str,
    pub table: &'a str,
    pub researcher: &'a str,
    pub collaboration: &'a str,
}

/// A DP fragment the researcher's remaining budget cannot cover.
pub fn over_budget(who: Spender<'_>, epsilon: f64, spent: f64, budget: f64) -> Refusal {
    let Spender {
        station,
        table,
        researcher,
        collaboration,
    } = who;
    Refusal {
        rule: Rule::DpBudget,
        message: format!(
            "policy: station '{station}' cannot spend ε = {epsilon} on table '{table}' for \
             researcher '{researcher}' in collaboration '{collaboration}': {spent} of the \
             budget {budget} is spent (dp.budget)"
        ),
    }
}

/// A train at a station whose policy allows no image.
/// A request that does not carry the secret of the station's hub (`railyard local`): its
/// stations answer their own hub only, so nobody else on the machine can send them tickets
/// (a fresh DP budget per researcher name, pseudonymized rows for anyone).
pub fn not_the_hub(station: &str) -> Refusal {
    Refusal {
        rule: Rule::HubOnly,
        message: format!(
            "policy: station '{station}' answers only its hub (the request does not carry the \
             hub's secret)"
        ),
    }
}

pub fn no_trains(station: &str) -> Refusal {
    Refusal {
        rule: Rule::Trains,
        message: format!(
            "policy: station '{station}' runs no trains (its policy allows no train image)"
        ),
    }
}

/// A train image the station does not allow, or does not have: both are refused alike, so
/// the answer tells nobody which images a station holds.
pub fn train_image(station: &str, image: &str) -> Refusal {
    Refusal {
        rule: Rule::TrainImage,
        message: format!(
            "policy: station '{station}' runs only the train images its policy allows; \
             '{image}' is not one of them"
        ),
    }
}

/// How many calls each researcher made in the last minute: the one sliding window behind
/// the hub's `max_queries_per_minute` and a station's `max_fragments_per_minute`.
#[derive(Debug, Default)]
pub struct RateWindow {
    recent: std::sync::Mutex<
        std::collections::HashMap<String, std::collections::VecDeque<std::time::Instant>>,
    >,
}

impl RateWindow {
    /// Counts a call by `researcher` now if fewer than `limit` fell in the last minute
    /// (0: no limit); whether it was admitted.
    pub fn admit(&self, researcher: &str, limit: u64) -> bool {
        if limit == 0 {
            return true;
        }
        let now = std::time::Instant::now();
        let minute = std::time::Duration::from_secs(60);
        // The lock guards map operations only; after a panic the map is still valid.
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        // Names nobody used for a minute are forgotten, so any number of names (a
        // compromised hub can send any) costs no lasting memory.
        if recent.len() > 1024 {
            recent.retain(|_, times| {
                times
                    .back()
                    .is_some_and(|t| now.duration_since(*t) < minute)
            });
        }
        let times = recent.entry(researcher.to_string()).or_default();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= minute)
        {
            times.pop_front();
        }
        let admitted = (times.len() as u64) < limit;
        if admitted {
            times.push_back(now);
        }
        admitted
    }
}

/// A researcher over the station's `max_fragments_per_minute`.
pub fn rate_limited(station: &str, limit: u64) -> Refusal {
    Refusal {
        rule: Rule::RateLimit,
        message: format!(
            "policy: station '{station}' runs at most {limit} fragments per minute for one \
             researcher; wait and ask again"
        ),
    }
}

/// A pseudonymized release at a station that holds no collaboration secret.
pub fn no_collaboration_secret(station: &str) -> Refusal {
    Refusal {
        rule: Rule::CollaborationSecret,
        message: format!(
            "policy: station '{station}' holds no collaboration secret, so it cannot \
             pseudonymize join keys"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_epsilon_is_bounded_by_the_policy() {
        let dp = DpPolicy {
            max_rows_per_unit: 1,
            budget: 10.0,
            max_epsilon: 1.0,
            epsilon: 0.5,
        };
        assert_eq!(query_epsilon(&dp, "s", None), Ok(0.5));
        assert_eq!(query_epsilon(&dp, "s", Some(1.0)), Ok(1.0));
        for bad in [0.0, -1.0, 1.01, f64::NAN, f64::INFINITY] {
            let r = query_epsilon(&dp, "s", Some(bad)).unwrap_err();
            assert_eq!(r.rule, Rule::DpEpsilon);
        }
        assert!(within_budget(9.5, 0.5, 10.0));
        assert!(!within_budget(9.6, 0.5, 10.0));
    }

    #[test]
    fn refusals_on_station_state_name_their_rule_and_no_value() {
        let who = Spender {
            station: "s",
            table: "lung",
            researcher: "alice",
            collaboration: "c",
        };
        let over = over_budget(who, 0.5, 9.75, 10.0);
        assert_eq!(over.rule, Rule::DpBudget);
        assert!(
            over.message.contains("researcher 'alice'"),
            "{}",
            over.message
        );
        assert_eq!(no_dp("s").rule, Rule::Dp);
        assert_eq!(no_trains("s").rule, Rule::Trains);
        let image = train_image("s", "img:latest");
        assert_eq!(image.rule, Rule::TrainImage);
        assert!(image.message.contains("'img:latest' is not one of them"));
        assert_eq!(no_collaboration_secret("s").rule, Rule::CollaborationSecret);
        for r in [
            over,
            no_dp("s"),
            no_trains("s"),
            no_collaboration_secret("s"),
        ] {
            assert!(
                r.message.starts_with("policy: station 's'"),
                "{}",
                r.message
            );
        }
    }
}
