//! The brokers' data volumes after they exist.
//!
//! A StatefulSet's `volumeClaimTemplates` cannot be changed once it exists
//! (the API server refuses the whole update), and the size derives from the
//! capacity: applying a new size through the template would stop every
//! later change of the instance. So the StatefulSet keeps the templates it
//! was created with (`keep_claim_templates`), and a larger size is asked of
//! each pod's PersistentVolumeClaim directly (`resize`), which volume
//! expansion then carries out; a smaller size or another storage class
//! cannot be applied to a volume that holds data, and is reported instead.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use serde_json::json;

use super::{Context, Result, event};
use crate::crd::MqttInstance;
use crate::resources::Object;

/// The claim template's name: a pod's claim is `data-<statefulset>-<ordinal>`.
const CLAIM: &str = "data";

/// The StatefulSet about to be applied keeps the claim templates of the
/// one that exists.
pub(super) fn keep_claim_templates(objects: &mut [Object], existing: Option<&StatefulSet>) {
    let Some(kept) = existing.and_then(|s| s.spec.volume_claim_templates.clone()) else {
        return;
    };
    for o in objects {
        if let Object::StatefulSet(sts) = o {
            sts.spec.volume_claim_templates = Some(kept.clone());
        }
    }
}

/// Asks every existing pod claim for at least `size`; reports what cannot
/// change. A refused resize (a storage class without expansion) is an
/// event, not a failed pass: the rest of the instance still reconciles.
pub(super) async fn resize(
    ctx: &Context,
    obj: &MqttInstance,
    ns: &str,
    sts: &str,
    replicas: i32,
    size: &Quantity,
    class: Option<&str>,
) -> Result<()> {
    let Some(want) = bytes(size) else {
        return Ok(());
    };
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    for i in 0..replicas {
        let name = format!("{CLAIM}-{sts}-{i}");
        let Some(pvc) = claims.get_opt(&name).await? else {
            continue;
        };
        let spec = pvc.spec.as_ref();
        let had = spec
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"));
        let have = had.and_then(bytes);
        let had_class = spec.and_then(|s| s.storage_class_name.as_deref());
        if let (Some(want_class), Some(had_class)) = (class, had_class)
            && want_class != had_class
        {
            event(
                ctx,
                obj,
                EventType::Warning,
                "StorageClassKept",
                format!("{name} stays on storage class {had_class}, not {want_class}: a volume's class cannot change, and the StatefulSet keeps the class it was created with"),
            )
            .await;
        }
        match have {
            Some(have) if want > have => {
                let patch = json!({"spec": {"resources": {"requests": {"storage": size.0}}}});
                let done = claims
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
                let (type_, reason, note) = match done {
                    Ok(_) => (
                        EventType::Normal,
                        "StorageResizing",
                        format!(
                            "{name}: {} -> {}",
                            had.map_or("?", |q| q.0.as_str()),
                            size.0
                        ),
                    ),
                    Err(e) => (
                        EventType::Warning,
                        "StorageResizeFailed",
                        format!(
                            "{name} stays at {}: {e} (does its storage class allow volume expansion?)",
                            had.map_or("?", |q| q.0.as_str())
                        ),
                    ),
                };
                event(ctx, obj, type_, reason, note).await;
            }
            Some(have) if want < have => {
                event(
                    ctx,
                    obj,
                    EventType::Warning,
                    "StorageNotShrunk",
                    format!(
                        "{name} stays at {}: a volume cannot shrink below {}",
                        had.map_or("?", |q| q.0.as_str()),
                        size.0
                    ),
                )
                .await;
            }
            _ => {}
        }
    }
    Ok(())
}

/// A storage quantity in bytes (`3Gi`, `1.5Gi`, `10G`, `1024`): the forms
/// the CRD's pattern allows, up to `Ti`; `None` for another (then nothing
/// is compared or changed).
fn bytes(q: &Quantity) -> Option<u128> {
    let s = q.0.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let (whole, frac) = n.split_once('.').unwrap_or((n, ""));
    let whole: u128 = whole.parse().ok()?;
    // Sizes are compared, not computed with: millionths are plenty.
    let frac_digits = frac.get(..frac.len().min(6))?;
    let frac_n: u128 = if frac_digits.is_empty() {
        0
    } else {
        frac_digits.parse().ok()?
    };
    let frac_scale = 10u128.pow(u32::try_from(frac_digits.len()).ok()?);
    let mul: u128 = match unit {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    whole
        .checked_mul(mul)?
        .checked_add(frac_n.checked_mul(mul)? / frac_scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_read_as_bytes() {
        let q = |s: &str| bytes(&Quantity(s.to_owned()));
        assert_eq!(q("3Gi"), Some(3 << 30));
        assert_eq!(q("500Mi"), Some(500 << 20));
        assert_eq!(q("10G"), Some(10_000_000_000));
        assert_eq!(q("1024"), Some(1024));
        assert!(q("2Gi") < q("3G"));
        assert_eq!(q("1.5Gi"), Some(3 << 29));
        assert!(q("2.5Gi") > q("2Gi"));
        assert_eq!(q("Gi"), None);
        assert_eq!(q("3Pi"), None);
    }
}
