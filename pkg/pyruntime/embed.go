// Package pyruntime holds the Python side of snakepit: the worker runtime
// (package snakepit, standard library only) and the bundled example adapters
// (package snakepit_examples). They are embedded in the daemon binary and
// written out once per content version by Install.
package pyruntime

import (
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
)

//go:embed snakepit/*.py snakepit_examples/*.py
var files embed.FS

// ExampleAdapter is the adapter a node serves when no pool is configured.
const ExampleAdapter = "snakepit_examples.example"

// WorkerModule is the module a worker process runs (python -m WorkerModule).
const WorkerModule = "snakepit._worker"

// Digest returns a short content hash of the embedded runtime. Two daemons
// with the same digest can share one installed copy.
func Digest() string {
	h := sha256.New()
	names := listFiles()
	for _, name := range names {
		b, _ := files.ReadFile(name)
		fmt.Fprintf(h, "%s\x00%d\x00", name, len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

func listFiles() []string {
	var names []string
	_ = fs.WalkDir(files, ".", func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			names = append(names, path)
		}
		return nil
	})
	sort.Strings(names)
	return names
}

// Install writes the runtime under dir/<digest> unless it is already there,
// and returns that directory, to be put on the workers' PYTHONPATH. The copy
// is written to a temporary directory and renamed into place, so a crash
// never leaves a half-written runtime and concurrent daemons do not collide.
func Install(dir string) (string, error) {
	dst := filepath.Join(dir, Digest())
	if _, err := os.Stat(filepath.Join(dst, ".complete")); err == nil {
		return dst, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("install python runtime: %w", err)
	}
	tmp, err := os.MkdirTemp(dir, ".tmp-")
	if err != nil {
		return "", fmt.Errorf("install python runtime: %w", err)
	}
	defer os.RemoveAll(tmp)
	for _, name := range listFiles() {
		b, err := files.ReadFile(name)
		if err != nil {
			return "", fmt.Errorf("install python runtime: %w", err)
		}
		p := filepath.Join(tmp, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return "", fmt.Errorf("install python runtime: %w", err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			return "", fmt.Errorf("install python runtime: %w", err)
		}
	}
	if err := os.WriteFile(filepath.Join(tmp, ".complete"), nil, 0o644); err != nil {
		return "", fmt.Errorf("install python runtime: %w", err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return "", fmt.Errorf("install python runtime: %w", err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		// Another daemon may have won the race; its copy is identical.
		if _, statErr := os.Stat(filepath.Join(dst, ".complete")); statErr == nil {
			return dst, nil
		}
		return "", fmt.Errorf("install python runtime: %w", err)
	}
	return dst, nil
}
