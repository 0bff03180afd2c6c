//! Logs and traces.
//!
//! - **Logs:** `RUST_LOG`-style filtering, JSON or pretty output on stderr. stdout is left
//!   alone: `serve` prints its address there, and `mcp` speaks the protocol on it. JSON lines
//!   at INFO and below are written in batches, within 100 ms ([`crate::log_buffer`]).
//! - **Traces:** OpenTelemetry over OTLP/HTTP (protobuf), built only when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set. The standard
//!   `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS` and
//!   `OTEL_BSP_*` variables apply. When no endpoint is set, no span is even created: the core
//!   checks [`traces_enabled`] and uses `Span::none()`, so tracing off costs one atomic load.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

static TRACES: AtomicBool = AtomicBool::new(false);

/// Whether spans are being exported (and so worth creating).
pub fn traces_enabled() -> bool {
    TRACES.load(Ordering::Relaxed)
}

/// Turns span creation on or off; `init` does this, and tests with their own exporter.
pub fn set_traces_enabled(on: bool) {
    TRACES.store(on, Ordering::Relaxed);
}

/// Keeps the trace pipeline alive; `shutdown` flushes what is buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter, and writes out held log lines (graceful shutdown).
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            // Through the log, so a JSON log stays JSON lines; flushed just below.
            tracing::error!(error = %e, "flushing traces failed");
        }
        crate::log_buffer::flush();
    }
}

/// What `check` finds wrong with the logging variables: `POE_GATEWAY_LOG_FORMAT` other than
/// `json` or `pretty`, a `RUST_LOG` that is not a filter. (`serve` says so and goes on with
/// the defaults: a typo in how to log should not keep the gateway down.)
pub fn check_env() -> Result<(), String> {
    if let Ok(f) = std::env::var("POE_GATEWAY_LOG_FORMAT")
        && f != "json"
        && f != "pretty"
    {
        return Err(format!(
            "POE_GATEWAY_LOG_FORMAT is {f:?}: use json or pretty"
        ));
    }
    if let Err(e) = EnvFilter::try_from_default_env()
        && std::env::var_os("RUST_LOG").is_some()
    {
        return Err(format!("RUST_LOG is not a log filter: {e}"));
    }
    Ok(())
}

/// rmcp logs every MCP request's arguments and every result at debug level: prompts,
/// answers, whole base64 attachments. Prompts and answers are never logged (the README's
/// promise), so rmcp is held at info unless `RUST_LOG` names it itself.
fn quiet_rmcp(filter: EnvFilter, rust_log: Option<&str>) -> EnvFilter {
    if rust_log.is_some_and(|v| v.contains("rmcp")) {
        return filter;
    }
    filter.add_directive("rmcp=info".parse().expect("a valid directive"))
}

/// Installs the global subscriber: logs, and traces when an OTLP endpoint is configured.
/// Must run inside a tokio runtime (the batch exporter is a task). Safe to call once only.
pub fn init() -> Telemetry {
    // Said once the log is set up, in its format: a plain line in the middle of JSON lines
    // breaks a log pipeline's parser.
    let mut problems = Vec::new();
    if let Err(e) = check_env() {
        problems.push(format!("{e}; logging with the defaults"));
    }
    let filter = quiet_rmcp(
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        std::env::var("RUST_LOG").ok().as_deref(),
    );
    let json = match std::env::var("POE_GATEWAY_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("pretty") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = if json {
        // tracing-subscriber's own JSON lines, written for less (see `json_log`).
        // stderr in batches: a write per access line cost 5-10 % of the throughput.
        crate::log_buffer::flush_on_panic();
        crate::json_log::layer(crate::log_buffer::BufferedStderr).boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    let (otel, provider) =
        match OtelSettings::from_env(crate::config::env_text().unwrap_or_default()) {
            Ok(Some(settings)) => match settings.build() {
                Ok(provider) => {
                    let tracer = provider.tracer("poe-gateway");
                    set_traces_enabled(true);
                    (
                        Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                        Some(provider),
                    )
                }
                Err(e) => {
                    problems.push(format!("traces disabled: {e}"));
                    (None, None)
                }
            },
            Ok(None) => (None, None),
            Err(e) => {
                problems.push(format!("traces disabled: {e}"));
                (None, None)
            }
        };
    // The OTel layer sees every span; the env filter applies to the log output only, so
    // RUST_LOG=warn still exports full traces.
    let _ = Registry::default()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    for p in problems {
        tracing::warn!("{p}");
    }
    Telemetry { provider }
}

/// Where and how to export traces, from the standard OTEL_* variables.
#[derive(Debug, Clone, PartialEq)]
pub struct OtelSettings {
    /// The full traces URL (`.../v1/traces`).
    pub endpoint: String,
    pub headers: HashMap<String, String>,
    pub timeout: Duration,
}

impl OtelSettings {
    /// `None` when no endpoint is set (tracing off). Only `http/protobuf` is supported;
    /// another `OTEL_EXPORTER_OTLP_PROTOCOL` is an error rather than a silent fallback.
    pub fn from_env<I: IntoIterator<Item = (String, String)>>(
        vars: I,
    ) -> Result<Option<OtelSettings>, String> {
        let env: HashMap<String, String> = vars.into_iter().collect();
        let get = |k: &str| {
            env.get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let endpoint = match (
            get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            // The signal-specific URL is used as given; the generic one gets the signal path.
            (Some(url), _) => url,
            (None, Some(base)) => format!("{}/v1/traces", base.trim_end_matches('/')),
            (None, None) => return Ok(None),
        };
        let protocol = get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| get("OTEL_EXPORTER_OTLP_PROTOCOL"));
        if let Some(p) = protocol.filter(|p| p != "http/protobuf") {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={p} is not supported; use http/protobuf (the collector's port 4318)"
            ));
        }
        let headers = get("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
            .or_else(|| get("OTEL_EXPORTER_OTLP_HEADERS"))
            .map(|h| {
                h.split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| {
                        let v = percent_encoding::percent_decode_str(v.trim()).decode_utf8_lossy();
                        (k.trim().to_string(), v.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let timeout = get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            .or_else(|| get("OTEL_EXPORTER_OTLP_TIMEOUT"))
            .and_then(|ms| ms.parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(10));
        Ok(Some(OtelSettings {
            endpoint,
            headers,
            timeout,
        }))
    }

    /// The tracer provider: OTLP/HTTP through our rustls client (so https collectors work),
    /// a batch processor on tokio (`OTEL_BSP_*` apply), and the service resource.
    pub fn build(&self) -> Result<SdkTracerProvider, String> {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("TLS setup: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = opentelemetry_http::hyper::HyperClient::new(https, self.timeout, None);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(self.endpoint.clone())
            .with_timeout(self.timeout)
            .with_headers(self.headers.clone())
            .build()
            .map_err(|e| format!("OTLP exporter: {e}"))?;
        let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
        let mut resource = Resource::builder();
        if !names_the_service(
            std::env::var("OTEL_SERVICE_NAME").ok().as_deref(),
            std::env::var("OTEL_RESOURCE_ATTRIBUTES").ok().as_deref(),
        ) {
            resource = resource.with_service_name("poe-gateway");
        }
        Ok(SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource.build())
            .build())
    }
}

/// Whether the standard variables name the service already: `OTEL_SERVICE_NAME`, or a
/// `service.name` in `OTEL_RESOURCE_ATTRIBUTES` (which the resource's own detector reads; a
/// default set over it would win).
fn names_the_service(service_name: Option<&str>, attributes: Option<&str>) -> bool {
    service_name.is_some_and(|n| !n.trim().is_empty())
        || attributes.is_some_and(|a| {
            a.split(',').any(|kv| {
                kv.split_once('=')
                    .is_some_and(|(k, v)| k.trim() == "service.name" && !v.trim().is_empty())
            })
        })
}

/// The trace context a caller sent (`traceparent`), to parent the request's span.
pub fn extract_context(headers: &http::HeaderMap) -> Option<opentelemetry::Context> {
    if !traces_enabled() || !headers.contains_key("traceparent") {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    Some(cx)
}

/// `traceparent` (and `tracestate`) for an outgoing request made inside `span`.
pub fn inject_context(span: &tracing::Span, headers: &mut http::HeaderMap) {
    if !traces_enabled() || span.is_none() {
        return;
    }
    TraceContextPropagator::new().inject_context(
        &span.context(),
        &mut opentelemetry_http::HeaderInjector(headers),
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_service_name_from_the_resource_attributes_is_kept() {
        assert!(!names_the_service(None, None));
        assert!(names_the_service(Some("gw"), None));
        assert!(names_the_service(
            None,
            Some("deployment.environment=prod,service.name=my-gw")
        ));
        assert!(!names_the_service(
            None,
            Some("deployment.environment=prod")
        ));
        assert!(!names_the_service(Some(" "), Some("service.name=")));
    }

    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn settings_from_env() {
        assert_eq!(OtelSettings::from_env(vars(&[])).unwrap(), None);
        let s = OtelSettings::from_env(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "x-tenant=a%20b,authorization=Bearer t",
            ),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(s.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(s.headers["x-tenant"], "a b");
        let s = OtelSettings::from_env(vars(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "https://x/custom",
        )]))
        .unwrap()
        .unwrap();
        assert_eq!(s.endpoint, "https://x/custom");
        assert!(
            OtelSettings::from_env(vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ]))
            .is_err()
        );
    }
}
