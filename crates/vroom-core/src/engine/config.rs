//! The config volume: read and changed through the guest agent while the
//! instance runs, by the host while it is stopped.

use super::*;

impl Engine {
    pub async fn config_get(&self, name: &str) -> Result<ConfigValues, OpError> {
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
        match cell.lock().instance.status.state {
            InstanceState::Running => {}
            InstanceState::Stopped | InstanceState::Failed => {
                return vroom_volume::read_config(&cell.volume())
                    .map_err(|e| OpError::internal("failed to read the config volume", e));
            }
            state => {
                return Err(OpError::conflict(format!(
                    "instance {name} is {state}; try again when it is running or stopped"
                )))
            }
        }
        match cell.agent.call(HostCommand::Health, AGENT_TIMEOUT).await {
            Ok(GuestReply::Health(report)) => Ok(sanitize_config(report.config)),
            Ok(_) => Err(OpError::new(
                ErrorCode::GuestError,
                "the guest answered with the wrong reply",
            )),
            Err(e) => Err(OpError::wrap(
                ErrorCode::GuestError,
                "cannot read the config from the guest",
                e,
            )),
        }
    }

    /// Sets some keys, keeping the others.
    pub async fn config_update(
        &self,
        name: &str,
        set: ConfigValues,
    ) -> Result<ConfigValues, OpError> {
        self.change_config(name, |current, _| {
            let mut values = current;
            values.extend(set);
            values
        })
        .await
    }

    /// Replaces the whole config (import).
    pub async fn config_replace(
        &self,
        name: &str,
        values: ConfigValues,
    ) -> Result<ConfigValues, OpError> {
        self.change_config(name, |_, _| values).await
    }

    /// Back to the image's seed config.
    pub async fn config_reset(&self, name: &str) -> Result<ConfigValues, OpError> {
        self.change_config(name, |_, seed| seed.clone()).await
    }

    pub(super) async fn change_config(
        &self,
        name: &str,
        change: impl FnOnce(ConfigValues, &ConfigValues) -> ConfigValues,
    ) -> Result<ConfigValues, OpError> {
        let cell = self.cell(name)?;
        let _op = cell.op.lock().await;
        let (state, image_id) = {
            let r = cell.lock();
            (r.instance.status.state, r.instance.image_id.clone())
        };
        let image = self.images.resolve(&image_id).map_err(image_error)?;
        let seed = &image.manifest.appliance.seed_config;
        let live = match state {
            InstanceState::Running => true,
            InstanceState::Stopped | InstanceState::Failed => false,
            state => {
                return Err(OpError::conflict(format!(
                    "instance {name} is {state}; try again when it is running or stopped"
                )))
            }
        };
        let current = if live {
            match cell.agent.call(HostCommand::Health, AGENT_TIMEOUT).await {
                Ok(GuestReply::Health(report)) => sanitize_config(report.config),
                _ => {
                    return Err(OpError::new(
                        ErrorCode::GuestError,
                        "cannot read the config from the guest",
                    ))
                }
            }
        } else {
            vroom_volume::read_config(&cell.volume())
                .map_err(|e| OpError::internal("failed to read the config volume", e))?
        };
        let values = change(current, seed);
        let schema = &image.manifest.appliance.config_schema;
        for (key, value) in &values {
            validate_config_key(key)?;
            validate_config_value(key, value)?;
            if schema.is_empty() && !seed.contains_key(key) {
                let known: Vec<&str> = seed.keys().map(String::as_str).collect();
                return Err(OpError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "unknown config key {key:?} for image {} (known: {})",
                        image.manifest.name,
                        known.join(", ")
                    ),
                ));
            }
        }
        if !schema.is_empty() {
            check_config(schema, &values)?;
        }
        let applied = if live {
            match cell
                .agent
                .call(
                    HostCommand::ApplyConfig {
                        values: values.clone(),
                    },
                    AGENT_TIMEOUT,
                )
                .await
            {
                Ok(GuestReply::ConfigApplied { values }) => sanitize_config(values),
                Ok(GuestReply::Error { message }) => {
                    return Err(OpError::new(
                        ErrorCode::GuestError,
                        format!("the guest reported: {}", truncate(&message)),
                    ))
                }
                Ok(_) => {
                    return Err(OpError::new(
                        ErrorCode::GuestError,
                        "the guest answered with the wrong reply",
                    ))
                }
                Err(e) => {
                    return Err(OpError::wrap(
                        ErrorCode::GuestError,
                        "cannot apply the config in the guest",
                        e,
                    ))
                }
            }
        } else {
            vroom_volume::write_config(&cell.volume(), &values)
                .map_err(|e| OpError::internal("failed to write the config volume", e))?;
            values
        };
        self.update(&cell, |r| r.instance.config = applied.clone())?;
        Ok(applied)
    }
}
