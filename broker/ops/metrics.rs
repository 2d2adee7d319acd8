//! `/metrics`: the broker's figures in the OpenMetrics text format (Prometheus' text
//! exposition format 1.0), encoded by the `prometheus-client` crate.
//!
//! Two sources feed it:
//! * Queue and topic counters and gauges are read from [`Broker::stats`] at scrape time by a
//!   [`Collector`], so they are exactly what `Stats` reports and deleted queues disappear.
//! * Histograms of lease-to-ack time and publish-to-deliver latency are fed by the broker's
//!   [`Observer`] hook as events happen, because a snapshot cannot reconstruct them.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::broker::domain::observe::Observer;
use crate::broker::domain::queue::QueueCounts;
use crate::broker::engine::local::stats::TopicCounts;
use crate::broker::engine::{Engine, StatsSnapshot};

/// The content type of the exposition.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of the lease-to-ack buckets: handlers run from milliseconds to
/// many minutes, and the default visibility timeout is 30 s.
const LEASE_TO_ACK_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0, 600.0,
];

/// Upper bounds (seconds) of the publish-to-deliver buckets: the broker measures in whole
/// milliseconds, so the first bucket holds deliveries within the same millisecond.
const PUBLISH_TO_DELIVER_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// Labels of a per-queue histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

/// Labels of a per-topic histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabel {
    topic: String,
}

fn lease_to_ack_histogram() -> Histogram {
    Histogram::new(LEASE_TO_ACK_BUCKETS)
}

fn publish_to_deliver_histogram() -> Histogram {
    Histogram::new(PUBLISH_TO_DELIVER_BUCKETS)
}

/// The histograms the broker's [`Observer`] hook feeds. Cloning shares the same series.
#[derive(Debug, Clone)]
pub(crate) struct Histograms {
    lease_to_ack: Family<QueueLabel, Histogram, fn() -> Histogram>,
    publish_to_deliver: Family<TopicLabel, Histogram, fn() -> Histogram>,
}

impl Default for Histograms {
    fn default() -> Self {
        Self {
            lease_to_ack: Family::new_with_constructor(lease_to_ack_histogram),
            publish_to_deliver: Family::new_with_constructor(publish_to_deliver_histogram),
        }
    }
}

impl Histograms {
    /// The histograms installed on `broker`, installing them if it has no observer yet.
    /// Every HTTP server of one broker so shares the same series.
    pub(crate) fn installed_on<E: Engine>(broker: &E) -> Self {
        let observer = broker.install_observer(|| Arc::new(Self::default()));
        let any: Arc<dyn Any + Send + Sync> = observer;
        match any.downcast::<Self>() {
            Ok(h) => (*h).clone(),
            Err(_) => {
                tracing::warn!(
                    "another observer is installed on this broker; /metrics histograms stay empty"
                );
                Self::default()
            }
        }
    }
}

impl Observer for Histograms {
    fn job_acked(&self, queue: &str, lease_to_ack: Duration) {
        self.lease_to_ack
            .get_or_create(&QueueLabel {
                queue: queue.to_owned(),
            })
            .observe(lease_to_ack.as_secs_f64());
    }

    fn queue_deleted(&self, queue: &str) {
        // Series of deleted queues would otherwise be exported (and kept) forever.
        self.lease_to_ack.remove(&QueueLabel {
            queue: queue.to_owned(),
        });
    }

    fn topic_deleted(&self, topic: &str) {
        self.publish_to_deliver.remove(&TopicLabel {
            topic: topic.to_owned(),
        });
    }

    fn messages_delivered(&self, topic: &str, latencies: &mut dyn Iterator<Item = Duration>) {
        let histogram = self.publish_to_deliver.get_or_create(&TopicLabel {
            topic: topic.to_owned(),
        });
        for latency in latencies {
            histogram.observe(latency.as_secs_f64());
        }
    }
}

/// Reads one counter of a queue's stats.
type CountOf = fn(&QueueCounts) -> u64;

/// Encodes the stats read for the scrape being rendered (see [`Metrics::render`]).
#[derive(Clone, Default)]
struct StatsCollector {
    scrape: Arc<std::sync::Mutex<Option<StatsSnapshot>>>,
}

impl std::fmt::Debug for StatsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsCollector").finish_non_exhaustive()
    }
}

/// Writes one metric family whose samples are `(labels, value)` pairs. Families with no
/// sample are left out, as OpenMetrics allows.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.into_iter().peekable();
    if samples.peek().is_none() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for StatsCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = crate::broker::sync::lock(&self.scrape).take() else {
            return Ok(());
        };
        let queues = &s.queues;
        let topics = &s.topics;
        encode_queues(&mut e, queues)?;
        encode_topics(&mut e, topics)?;
        for (name, help, n) in [
            ("sluice_queues", "Queues the broker holds.", queues.len()),
            ("sluice_topics", "Topics the broker holds.", topics.len()),
        ] {
            let gauge = ConstGauge::new(n as i64);
            gauge.encode(e.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// The per-queue families: jobs by state, the lifetime counters, age, consumers, pause.
fn encode_queues(
    e: &mut DescriptorEncoder,
    queues: &[(String, QueueCounts)],
) -> Result<(), std::fmt::Error> {
    let q = |name: &str| [("queue", name.to_owned())];
    family(
        e,
        "sluice_queue_jobs",
        "Live jobs of a queue by state (pending, scheduled, leased, retrying).",
        MetricType::Gauge,
        queues.iter().flat_map(|(name, c)| {
            [
                ("pending", c.pending),
                ("scheduled", c.scheduled),
                ("leased", c.leased),
                ("retrying", c.retrying),
            ]
            .map(|(state, n)| {
                (
                    [("queue", name.clone()), ("state", state.to_owned())],
                    ConstGauge::new(n as i64),
                )
            })
        }),
    )?;
    let counters: [(&str, &str, CountOf); 5] = [
        (
            "sluice_jobs_enqueued",
            "Jobs enqueued into a queue since the broker started (dead letters and topic bindings included).",
            |c| c.enqueued,
        ),
        (
            "sluice_jobs_completed",
            "Jobs acked since the broker started.",
            |c| c.completed,
        ),
        (
            "sluice_job_deliveries_failed",
            "Failed deliveries (nacks and lease expiries) since the broker started.",
            |c| c.failed,
        ),
        (
            "sluice_jobs_dead_lettered",
            "Jobs that ran out of attempts or were nacked as poison since the broker started.",
            |c| c.dead,
        ),
        (
            "sluice_jobs_cancelled",
            "Jobs cancelled or purged since the broker started.",
            |c| c.cancelled,
        ),
    ];
    for (name, help, get) in counters {
        family(
            e,
            name,
            help,
            MetricType::Counter,
            queues
                .iter()
                .map(|(n, c)| (q(n), ConstCounter::new(get(c)))),
        )?;
    }
    family(
        e,
        "sluice_queue_oldest_pending_age_seconds",
        "How long the oldest visible job of a queue has waited for a worker.",
        MetricType::Gauge,
        queues.iter().map(|(n, c)| {
            (
                q(n),
                ConstGauge::new(c.oldest_pending_age_ms as f64 / 1000.0),
            )
        }),
    )?;
    family(
        e,
        "sluice_queue_consumers",
        "Consumers of a queue seen in the last 60 s or holding leases.",
        MetricType::Gauge,
        queues
            .iter()
            .map(|(n, c)| (q(n), ConstGauge::new(c.consumers as i64))),
    )?;
    family(
        e,
        "sluice_queue_paused",
        "1 while leasing from the queue is paused.",
        MetricType::Gauge,
        queues
            .iter()
            .map(|(n, c)| (q(n), ConstGauge::new(i64::from(c.paused)))),
    )?;
    family(
        e,
        "sluice_queue_created_by_consumer",
        "1 while only consumers have named the queue: a Lease or Consume created it and nothing has enqueued to it or set its policy since (most often a worker's typo).",
        MetricType::Gauge,
        queues
            .iter()
            .map(|(n, c)| (q(n), ConstGauge::new(i64::from(c.created_by_consumer)))),
    )?;
    encode_limits(e, queues)
}

/// Whether a queue has a limit, so its gauges are exported.
type HasLimit = fn(&QueueCounts) -> bool;

/// The per-queue families of the rate and in-flight limits. Gauges only for queues that
/// have the limit (no sample means no limit, never a limit of 0); the time each limit held
/// jobs back for every queue, as counters that keep counting across policy changes.
fn encode_limits(
    e: &mut DescriptorEncoder,
    queues: &[(String, QueueCounts)],
) -> Result<(), std::fmt::Error> {
    let q = |name: &str| [("queue", name.to_owned())];
    let in_flight: HasLimit = |c| c.max_in_flight > 0;
    let rated: HasLimit = |c| c.rate_limit_per_second > 0;
    let gauges: [(&str, &str, HasLimit, CountOf); 5] = [
        (
            "sluice_queue_max_in_flight",
            "The policy's max_in_flight: leases a queue may have out at once across all workers.",
            in_flight,
            |c| c.max_in_flight.into(),
        ),
        (
            "sluice_queue_in_flight",
            "Leases a queue with max_in_flight has out now: how much of the limit is in use.",
            in_flight,
            |c| c.leased,
        ),
        (
            "sluice_queue_rate_limit_per_second",
            "The policy's rate limit: jobs a queue hands out per second.",
            rated,
            |c| c.rate_limit_per_second.into(),
        ),
        (
            "sluice_queue_rate_limit_burst",
            "The policy's rate limit burst: jobs the bucket holds when full.",
            rated,
            |c| c.rate_limit_burst.into(),
        ),
        (
            "sluice_queue_rate_limit_tokens",
            "Whole tokens in the rate limit's bucket: jobs it would hand out now.",
            rated,
            |c| c.rate_tokens,
        ),
    ];
    for (name, help, has, get) in gauges {
        family(
            e,
            name,
            help,
            MetricType::Gauge,
            queues
                .iter()
                .filter(|(_, c)| has(c))
                .map(|(n, c)| (q(n), ConstGauge::new(get(c) as i64))),
        )?;
    }
    let held_back: [(&str, &str, CountOf); 2] = [
        (
            "sluice_queue_rate_limited_seconds",
            "Time since the broker started that the rate limit held visible jobs back from leases that asked for them.",
            |c| c.rate_limited_ms,
        ),
        (
            "sluice_queue_in_flight_limited_seconds",
            "Time since the broker started that max_in_flight held visible jobs back from leases that asked for them, until a lease ended.",
            |c| c.in_flight_limited_ms,
        ),
    ];
    for (name, help, get) in held_back {
        family(
            e,
            name,
            help,
            MetricType::Counter,
            queues
                .iter()
                .map(|(n, c)| (q(n), ConstCounter::new(get(c) as f64 / 1000.0))),
        )?;
    }
    Ok(())
}

/// A per-topic family: name, help, type and the count it reports.
type TopicFamily = (
    &'static str,
    &'static str,
    MetricType,
    fn(&TopicCounts) -> u64,
);

/// The per-topic families: published and gap notices (counters), the retention log's size
/// and sequences, and subscribers (gauges), in that order of exposition.
fn encode_topics(e: &mut DescriptorEncoder, topics: &[TopicCounts]) -> Result<(), std::fmt::Error> {
    let t = |name: &str| [("topic", name.to_owned())];
    let families: [TopicFamily; 7] = [
        (
            "sluice_topic_messages_published",
            "Messages appended to a topic since the broker started.",
            MetricType::Counter,
            |c| c.published,
        ),
        (
            "sluice_topic_retained_messages",
            "Messages in a topic's retention log.",
            MetricType::Gauge,
            |c| c.retained_messages,
        ),
        (
            "sluice_topic_retained_bytes",
            "Payload bytes in a topic's retention log.",
            MetricType::Gauge,
            |c| c.retained_bytes,
        ),
        (
            "sluice_topic_first_sequence",
            "Oldest retained sequence of a topic (0 when its log is empty).",
            MetricType::Gauge,
            |c| c.first_sequence,
        ),
        (
            "sluice_topic_last_sequence",
            "Newest sequence of a topic (0 before its first message).",
            MetricType::Gauge,
            |c| c.last_sequence,
        ),
        (
            "sluice_topic_subscribers",
            "Open subscriptions whose pattern matches a topic.",
            MetricType::Gauge,
            |c| u64::from(c.subscribers),
        ),
        (
            "sluice_topic_subscriber_gaps",
            "Gap notices (or DATA_LOSS ends) given to subscribers that fell behind retention.",
            MetricType::Counter,
            |c| c.gaps,
        ),
    ];
    for (name, help, kind, get) in families {
        let samples = topics.iter().map(|c| (t(&c.name), get(c)));
        if matches!(kind, MetricType::Counter) {
            family(
                e,
                name,
                help,
                kind,
                samples.map(|(l, n)| (l, ConstCounter::new(n))),
            )?;
        } else {
            family(
                e,
                name,
                help,
                kind,
                samples.map(|(l, n)| (l, ConstGauge::new(n as i64))),
            )?;
        }
    }
    Ok(())
}

/// The `/metrics` registry of one broker.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// The stats of the scrape in progress; the render lock keeps concurrent scrapes from
    /// taking each other's.
    scrape: Arc<std::sync::Mutex<Option<StatsSnapshot>>>,
    rendering: std::sync::Mutex<()>,
}

impl Metrics {
    /// A registry over `broker`: its stats at scrape time, and its timing histograms.
    pub(crate) fn new<E: Engine>(broker: &E) -> Self {
        let histograms = Histograms::installed_on(broker);
        let mut registry = Registry::default();
        registry.register(
            "sluice_build",
            "The broker's version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "sluice_lease_to_ack_seconds",
            "Time from a job's lease to its ack, per queue (whole milliseconds)",
            histograms.lease_to_ack,
        );
        registry.register(
            "sluice_publish_to_deliver_seconds",
            "Time from a message's publish to its hand-over to a subscriber's stream, per topic; live deliveries only, not replays (whole milliseconds)",
            histograms.publish_to_deliver,
        );
        let collector = StatsCollector::default();
        let scrape = collector.scrape.clone();
        registry.register_collector(Box::new(collector));
        Self {
            registry,
            scrape,
            rendering: std::sync::Mutex::new(()),
        }
    }

    /// The exposition text of `stats` and the histograms, ending with `# EOF`.
    pub(crate) fn render(&self, stats: StatsSnapshot) -> String {
        let _one_at_a_time = crate::broker::sync::lock(&self.rendering);
        *crate::broker::sync::lock(&self.scrape) = Some(stats);
        let mut out = String::with_capacity(16 * 1024);
        text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
