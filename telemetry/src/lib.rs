//! Logging and traces. Logs go to stderr as text or JSON; the filter comes
//! from `LOCKSTEP_LOG` (default `info`).
//!
//! Traces: OpenTelemetry, exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the standard variable; e.g.
//! `http://127.0.0.1:4317`), sampled at `OTEL_TRACES_SAMPLER_ARG` (a ratio,
//! default 1.0) unless the caller's `traceparent` already decided. When the
//! variable is unset, no exporter exists and the trace spans (target
//! [`TRACE_TARGET`]) are disabled at their call sites: no cost.
//!
//! The path of one push: the device's `traceparent` metadata → span
//! `lockstep.push` → span `kafka.produce`, whose context travels in each
//! record's `traceparent` header → span `lockstep.deliver` on every node that
//! sends the change to a device (a child of `kafka.produce`, so one push is
//! one trace) → `DeliveredChange.traceparent` to the device. No attribute
//! ever holds a ciphertext, record id, collection or token.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
};

use opentelemetry::{
    Context, global,
    propagation::{Extractor, Injector},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer, filter::Targets, layer::SubscriberExt, registry::LookupSpan, util::SubscriberInitExt,
};

/// The target of every span that is exported as a trace.
pub const TRACE_TARGET: &str = "lockstep::trace";

static TRACING: AtomicBool = AtomicBool::new(false);

/// Whether traces are exported (spans and headers are made only then).
pub fn tracing_on() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Flushes traces at exit.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is left, for at most 1 s (an unreachable collector must
    /// not hold the process past its drain deadline).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown_with_timeout(std::time::Duration::from_secs(1))
        {
            eprintln!("traces were not all exported: {error}");
        }
    }
}

fn sample_ratio() -> f64 {
    std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().and_then(|ratio| ratio.trim().parse().ok()).unwrap_or(1.0)
}

fn tracer_provider(service: &str) -> Option<SdkTracerProvider> {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|endpoint| !endpoint.trim().is_empty())?;
    let exporter = match opentelemetry_otlp::SpanExporter::builder().with_tonic().build() {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("traces are off: cannot build the OTLP exporter for {endpoint}: {error}");
            return None;
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(sample_ratio()))))
        .with_resource(Resource::builder().with_service_name(service.to_owned()).build())
        .build();
    Some(provider)
}

/// Sets up logging (and traces when configured) for the process `service`.
pub fn init(json: bool) -> Telemetry {
    init_service("lockstep", json)
}

pub fn init_service(service: &str, json: bool) -> Telemetry {
    let logs_filter = || {
        EnvFilter::try_from_env("LOCKSTEP_LOG")
            .unwrap_or_else(|_| EnvFilter::new("info"))
            .add_directive(format!("{TRACE_TARGET}=off").parse().expect("a valid directive"))
    };
    let logs = if json {
        tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).with_filter(logs_filter()).boxed()
    } else {
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(logs_filter()).boxed()
    };
    let provider = tracer_provider(service);
    let traces = provider.as_ref().map(|provider| {
        global::set_text_map_propagator(TraceContextPropagator::new());
        TRACING.store(true, Ordering::Relaxed);
        traces_layer(provider.tracer("lockstep"))
    });
    if let Err(error) = tracing_subscriber::registry().with(logs).with(traces).try_init() {
        eprintln!("logging was set up already: {error}");
    }
    Telemetry { provider }
}

fn traces_layer<S>(tracer: opentelemetry_sdk::trace::Tracer) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(Targets::new().with_target(TRACE_TARGET, tracing::Level::TRACE))
}

/// gRPC metadata as an OpenTelemetry carrier.
pub struct MetadataExtractor<'a>(pub &'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                tonic::metadata::KeyRef::Ascii(key) => Some(key.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The caller's trace context from gRPC metadata, as the parent of `span`.
pub fn continue_from(metadata: &tonic::metadata::MetadataMap, span: &tracing::Span) {
    if !tracing_on() {
        return;
    }
    let parent = global::get_text_map_propagator(|propagator| propagator.extract(&MetadataExtractor(metadata)));
    if parent.span().span_context().is_valid() {
        // Fails only when the span is disabled (not sampled in): then there is nothing to link.
        let _ = span.set_parent(parent);
    }
}

/// The W3C `traceparent` of `span`, if traces are on and it is sampled (an
/// unsampled push sends no context on, so its delivery makes no spans).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !tracing_on() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if !span_context.is_valid() || !span_context.is_sampled() {
        return None;
    }
    let mut carrier = HashMap::new();
    global::get_text_map_propagator(|propagator| propagator.inject_context(&context, &mut CarrierMap(&mut carrier)));
    carrier.remove("traceparent")
}

/// A `traceparent` as the parent of `span`.
pub fn set_parent_traceparent(span: &tracing::Span, traceparent: &str) {
    if !tracing_on() || traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let parent: Context = global::get_text_map_propagator(|propagator| propagator.extract(&CarrierRef(&carrier)));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

struct CarrierMap<'a>(&'a mut HashMap<String, String>);

impl Injector for CarrierMap<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct CarrierRef<'a>(&'a HashMap<String, String>);

impl Extractor for CarrierRef<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}
