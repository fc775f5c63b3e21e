package dev.sluice;

import io.apicurio.common.apps.config.DynamicConfigPropertyList;
import java.util.List;
import javax.enterprise.context.ApplicationScoped;
import javax.enterprise.inject.Produces;

/** The list of dynamic configuration properties, which Apicurio's build extension would generate. */
@ApplicationScoped
public class ConfigList {
    @Produces
    @ApplicationScoped
    DynamicConfigPropertyList list() {
        return new DynamicConfigPropertyList(List.of());
    }
}
