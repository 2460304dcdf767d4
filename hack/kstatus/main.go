// kstatus-check: computes the kstatus of each object read from stdin (a JSON
// object, a JSON array, or a v1 List) with sigs.k8s.io/cli-utils/pkg/kstatus,
// the library GitOps tools (Flux, kpt, cli-utils appliers) judge readiness
// with. Prints one JSON line per object: kind, name, status, message.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(err)
	}
	var raw interface{}
	// Whole numbers as int64 (metadata.generation), as the API machinery reads them.
	if err := utiljson.Unmarshal(data, &raw); err != nil {
		fail(err)
	}
	var items []interface{}
	switch v := raw.(type) {
	case []interface{}:
		items = v
	case map[string]interface{}:
		if list, ok := v["items"].([]interface{}); ok {
			items = list
		} else {
			items = []interface{}{v}
		}
	default:
		fail(fmt.Errorf("expected a JSON object or array"))
	}
	out := json.NewEncoder(os.Stdout)
	for _, item := range items {
		obj, ok := item.(map[string]interface{})
		if !ok {
			fail(fmt.Errorf("not an object: %v", item))
		}
		u := &unstructured.Unstructured{Object: obj}
		res, err := status.Compute(u)
		if err != nil {
			fail(err)
		}
		_ = out.Encode(map[string]string{
			"kind": u.GetKind(), "name": u.GetName(),
			"status": res.Status.String(), "message": res.Message,
		})
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "kstatus-check:", err)
	os.Exit(2)
}
