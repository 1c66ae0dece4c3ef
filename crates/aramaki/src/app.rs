//! The running server: the HTTP listener and the timeline's subscribers.
//! `App::build` binds (port 0 in tests) so the address is known before
//! `run`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::context::Context;
use crate::timeline::subscribers::{self, LiveTail, Subscriber};

pub struct App {
    ctx: Arc<Context>,
    listener: TcpListener,
    addr: SocketAddr,
    /// The TLS listener for peers (`federation.listen`), bound with the
    /// main one so that a taken port fails the start.
    peers: Option<TcpListener>,
}

/// Stops a running [`App`] when dropped or told to.
#[derive(Clone)]
pub struct Shutdown(watch::Sender<bool>);

impl Shutdown {
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

impl App {
    pub async fn build(ctx: Arc<Context>, listen: SocketAddr) -> std::io::Result<App> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let peers = match &ctx.config.federation.listen {
            Some(at) => Some(TcpListener::bind(at).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("federation.listen {at}: {e}"))
            })?),
            None => None,
        };
        Ok(App {
            ctx,
            listener,
            addr,
            peers,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn context(&self) -> Arc<Context> {
        self.ctx.clone()
    }

    /// Serves until `stop` turns true.
    pub async fn run(self, stop: watch::Receiver<bool>) -> std::io::Result<()> {
        let subs: Vec<Arc<dyn Subscriber>> = vec![
            Arc::new(LiveTail),
            Arc::new(crate::federation::uses::FederationOut),
        ];
        for sub in subs {
            tokio::spawn(subscribers::run(self.ctx.clone(), sub, stop.clone()));
        }
        crate::timeline::batch::Appender::spawn(self.ctx.clone(), stop.clone());
        crate::monitoring::ingest::Ingest::spawn(self.ctx.clone(), stop.clone());
        crate::monitoring::watch::spawn(self.ctx.clone(), stop.clone());
        crate::federation::link::spawn(self.ctx.clone(), stop.clone());
        let (ctx, mut stop_streams) = (self.ctx.clone(), stop.clone());
        tokio::spawn(async move {
            while !*stop_streams.borrow() {
                if stop_streams.changed().await.is_err() {
                    return;
                }
            }
            ctx.timeline.close();
        });
        let router = crate::web::app(self.ctx.clone());
        if let Some(tcp) = self.peers {
            serve_peers(&self.ctx, tcp, router.clone(), stop.clone())?;
        }
        let mut stop_http = stop.clone();
        // The peer address feeds login throttling per source.
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(self.listener, service)
            .with_graceful_shutdown(async move {
                while !*stop_http.borrow() {
                    if stop_http.changed().await.is_err() {
                        // The sender is gone: nobody can stop us any more.
                        std::future::pending::<()>().await;
                    }
                }
            })
            .await
    }

    /// Runs in the background; returns the address and a stop handle.
    pub fn spawn(
        self,
    ) -> (
        SocketAddr,
        Shutdown,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let (tx, rx) = watch::channel(false);
        let addr = self.addr;
        let handle = tokio::spawn(self.run(rx));
        (addr, Shutdown(tx), handle)
    }
}

/// The federation listener: the same routes, over TLS with a certificate
/// of the instance key, for peers that pin it.
fn serve_peers(
    ctx: &Context,
    tcp: TcpListener,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listen = tcp.local_addr()?.to_string();
    let config = crate::federation::tls::server_config(ctx.identity.clone())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    tracing::info!(%listen, "federation listener (TLS with the instance key)");
    let listener = crate::federation::tls::Listener::new(tcp, config);
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                while !*stop.borrow() {
                    if stop.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the federation listener stopped");
        }
    });
    Ok(())
}
