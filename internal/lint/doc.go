// Package lint holds tests that check the repository's own conventions
// (STYLE.md): every package documents itself.
package lint
