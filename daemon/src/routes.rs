//! An axum router that remembers its routes, so that a test can ask every
//! write endpoint whether it refuses a request without a token: a route
//! added without a check fails that test instead of shipping open.

use axum::Router;
use axum::handler::Handler;
use axum::routing::{MethodFilter, on};

/// A method a route answers; `Any` for the ones that take every method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Post,
    Delete,
    Any,
}

impl Method {
    /// Whether requests with this method change something.
    pub fn writes(self) -> bool {
        !matches!(self, Method::Get)
    }
}

/// The routes so far, and the router they make.
pub struct Routes<S> {
    router: Router<S>,
    table: Vec<(Method, &'static str)>,
}

impl<S: Clone + Send + Sync + 'static> Default for Routes<S> {
    fn default() -> Self {
        Routes {
            router: Router::new(),
            table: Vec::new(),
        }
    }
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    /// Adds `handler` for `method` on `path` (several methods on one path
    /// merge, as with axum).
    pub fn on<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        let route = match method {
            Method::Get => on(MethodFilter::GET, handler),
            Method::Put => on(MethodFilter::PUT, handler),
            Method::Post => on(MethodFilter::POST, handler),
            Method::Delete => on(MethodFilter::DELETE, handler),
            Method::Any => axum::routing::any(handler),
        };
        self.router = self.router.route(path, route);
        self.table.push((method, path));
        self
    }

    pub fn get<H: Handler<T, S>, T: 'static>(self, path: &'static str, handler: H) -> Self {
        self.on(Method::Get, path, handler)
    }

    pub fn put<H: Handler<T, S>, T: 'static>(self, path: &'static str, handler: H) -> Self {
        self.on(Method::Put, path, handler)
    }

    /// Every route as (method, path), in the order added.
    pub fn table(&self) -> &[(Method, &'static str)] {
        &self.table
    }

    pub fn into_router(self) -> Router<S> {
        self.router
    }
}

/// A concrete path for a route's pattern: `{name}` and `{*rest}` become
/// `x` (what a test sends).
pub fn example_path(pattern: &str) -> String {
    pattern
        .split('/')
        .map(|segment| {
            if segment.starts_with('{') && segment.ends_with('}') {
                "x"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_remembered_with_their_methods() {
        async fn ok() {}
        let routes: Routes<()> = Routes::default()
            .get("/v1/a/{id}", ok)
            .put("/v1/a/{id}", ok)
            .on(Method::Any, "/v1/b/{*rest}", ok);
        let writes: Vec<_> = routes
            .table()
            .iter()
            .filter(|(m, _)| m.writes())
            .map(|(m, p)| (*m, example_path(p)))
            .collect();
        assert_eq!(
            writes,
            vec![
                (Method::Put, "/v1/a/x".to_string()),
                (Method::Any, "/v1/b/x".to_string())
            ]
        );
        let _router = routes.into_router();
    }
}
