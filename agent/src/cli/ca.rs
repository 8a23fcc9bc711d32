//! `signpost ca ...`: the mesh's CA on the control plane
//! (`/v1/connect/ca/...`): its roots, and a rotation.

use anyhow::Context as _;
use serde_json::json;
use signpost_core::consul::CaRootList;

use super::{Client, str_of, table};

/// The rows of `signpost ca roots`.
fn rows(list: &CaRootList) -> Vec<Vec<String>> {
    list.roots
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.name.clone(),
                if r.active { "yes" } else { "no" }.to_string(),
                if r.intermediate_certs.is_empty() {
                    "no"
                } else {
                    "yes"
                }
                .to_string(),
            ]
        })
        .collect()
}

/// `signpost ca roots`: the roots every agent trusts.
pub async fn roots(client: &Client, json: bool) -> anyhow::Result<()> {
    let body = client.get("/v1/connect/ca/roots").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let list: CaRootList =
        serde_json::from_value(body).context("the CA roots are not in Consul's shape")?;
    println!("trust domain: {}", list.trust_domain);
    table(&["ID", "NAME", "ACTIVE", "CROSS-SIGNED"], rows(&list));
    Ok(())
}

/// `signpost ca rotate`: a new root, cross-signed by the old one.
pub async fn rotate(client: &Client) -> anyhow::Result<()> {
    let answer = client
        .post_body("/v1/connect/ca/rotate", &json!({}), "rotate the mesh CA")
        .await?;
    println!(
        "Mesh CA rotated: root {} signs from now on; agents renew their certificates now, and the old root stays trusted until the last certificate it signed expires",
        str_of(&answer, "ID")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_core::consul::CaRoot;

    #[test]
    fn roots_show_which_signs_and_which_is_cross_signed() {
        let root = |id: &str, active: bool, cross: bool| CaRoot {
            id: id.into(),
            name: format!("Signpost mesh CA {id}"),
            root_cert: String::new(),
            intermediate_certs: if cross { vec!["x".into()] } else { vec![] },
            active,
            create_index: 1,
            modify_index: 1,
        };
        let list = CaRootList {
            active_root_id: "b".into(),
            trust_domain: "signpost.mesh".into(),
            roots: vec![root("a", false, false), root("b", true, true)],
        };
        assert_eq!(
            rows(&list),
            [
                ["a", "Signpost mesh CA a", "no", "no"],
                ["b", "Signpost mesh CA b", "yes", "yes"]
            ]
        );
    }
}
