package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"

	"github.com/pelletier/go-toml/v2"
	"github.com/spf13/viper"
	"go.yaml.in/yaml/v3"

	"github.com/snakepit/snakepit/pkg/agent"
)

// setDefaults registers every scalar key of the config (nested structs
// included, as "a.b") with its default, so that each can be overridden by a
// SNAKEPIT_A_B environment variable. Lists and maps (pools, labels) are
// configured in the file only.
func setDefaults(v *viper.Viper, prefix string, rv reflect.Value) {
	rt := rv.Type()
	for i := 0; i < rt.NumField(); i++ {
		f := rt.Field(i)
		key := f.Tag.Get("mapstructure")
		if key == "" || key == "-" || !f.IsExported() {
			continue
		}
		if prefix != "" {
			key = prefix + "." + key
		}
		fv := rv.Field(i)
		switch fv.Kind() {
		case reflect.Struct:
			setDefaults(v, key, fv)
		case reflect.Slice, reflect.Map, reflect.Pointer, reflect.Interface:
		default:
			v.SetDefault(key, fv.Interface())
		}
	}
}

// restoreKeyCase puts back the case of the keys of maps whose keys are
// case-sensitive (pools[].env, discovery.labels): the configuration library
// lowercases every key it reads, which would turn OMP_NUM_THREADS into
// omp_num_threads in a worker's environment.
func restoreKeyCase(file string, cfg *agent.Config) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	var raw struct {
		Pools []struct {
			Name string            `json:"name" yaml:"name" toml:"name"`
			Env  map[string]string `json:"env" yaml:"env" toml:"env"`
		} `json:"pools" yaml:"pools" toml:"pools"`
		Discovery struct {
			Labels map[string]string `json:"labels" yaml:"labels" toml:"labels"`
		} `json:"discovery" yaml:"discovery" toml:"discovery"`
	}
	switch strings.ToLower(filepath.Ext(file)) {
	case ".yaml", ".yml":
		err = yaml.Unmarshal(b, &raw)
	case ".json":
		err = json.Unmarshal(b, &raw)
	case ".toml":
		err = toml.Unmarshal(b, &raw)
	default:
		return nil
	}
	if err != nil {
		return fmt.Errorf("read config file %s: %w", file, err)
	}
	for i := range cfg.Pools {
		if i < len(raw.Pools) && len(raw.Pools[i].Env) > 0 {
			cfg.Pools[i].Env = raw.Pools[i].Env
		}
	}
	if len(raw.Discovery.Labels) > 0 {
		cfg.Discovery.Labels = raw.Discovery.Labels
	}
	return nil
}
